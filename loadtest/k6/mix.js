// A realistic mix: REPEAT_RATIO (default 0.8) of requests repeat a few common phrases (cache
// hits once seen), the rest are unique (misses). Latency is reported per kind through tags.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=4 -e REPEAT_RATIO=0.8 loadtest/k6/mix.js
import { Rate } from 'k6/metrics';
import { PHRASES, checkAudio, envNumber, loadOptions, pick, speech, uniqueText } from './lib/common.js';

const REPEAT_RATIO = envNumber('REPEAT_RATIO', 0.8);
const cacheHits = new Rate('cache_hits');

export const options = loadOptions(
  'mix',
  { p95: 5000, p99: 10000, vus: 4 },
  {
    'http_req_duration{kind:repeated}': [`p(95)<${envNumber('REPEATED_P95_MS', 1000)}`],
    'http_req_duration{kind:unique}': [`p(95)<${envNumber('UNIQUE_P95_MS', 8000)}`],
  },
);

export default function () {
  const repeated = Math.random() < REPEAT_RATIO;
  const text = repeated ? pick(PHRASES) : uniqueText(__ITER);
  const res = speech(text, { tags: { kind: repeated ? 'repeated' : 'unique' } });
  checkAudio(res);
  cacheHits.add(res.headers['X-Cache'] === 'HIT');
}
