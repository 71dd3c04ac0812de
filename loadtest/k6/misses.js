// Cache misses: every text is unique (run id, VU and iteration in it), so every request is
// synthesized by a worker. Latency budgets are seconds, not milliseconds.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=2 -e DURATION=30s loadtest/k6/misses.js
import { Rate } from 'k6/metrics';
import { checkAudio, loadOptions, speech, uniqueText } from './lib/common.js';

const cacheMisses = new Rate('cache_misses');

export const options = loadOptions(
  'misses',
  { p95: 5000, p99: 10000, vus: 2 },
  { cache_misses: ['rate>0.99'] },
);

export default function () {
  const res = speech(uniqueText(__ITER));
  checkAudio(res, 'MISS');
  cacheMisses.add(res.headers['X-Cache'] === 'MISS');
}
