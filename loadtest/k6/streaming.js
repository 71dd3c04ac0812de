// Streaming: the cache is bypassed (Cache-Control: no-cache), so every response is streamed
// from a worker as it is synthesized. Time to first byte (k6's http_req_waiting) is the time
// to first audio; http_req_duration is the whole utterance.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=2 -e TTFB_P95_MS=1500 loadtest/k6/streaming.js
import { Trend } from 'k6/metrics';
import { PHRASES, checkAudio, envNumber, loadOptions, pick, speech } from './lib/common.js';

const firstAudio = new Trend('time_to_first_audio', true);

export const options = loadOptions(
  'streaming',
  { p95: 8000, p99: 15000, vus: 2 },
  {
    http_req_waiting: [
      `p(95)<${envNumber('TTFB_P95_MS', 2000)}`,
      `p(99)<${envNumber('TTFB_P99_MS', 4000)}`,
    ],
  },
);

export default function () {
  const res = speech(pick(PHRASES), { noCache: true });
  checkAudio(res, 'BYPASS');
  if (res.status === 200) {
    firstAudio.add(res.timings.waiting);
  }
}
