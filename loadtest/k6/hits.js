// Cache hits: setup() requests every phrase once; then every request should be an X-Cache HIT
// answered from Redis. Thresholds: error rate, p95/p99 latency, and the hit rate itself.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=8 -e DURATION=30s loadtest/k6/hits.js
import { Rate } from 'k6/metrics';
import { PHRASES, checkAudio, loadOptions, pick, primeCache, speech } from './lib/common.js';

const cacheHits = new Rate('cache_hits');

export const options = loadOptions(
  'hits',
  { p95: 250, p99: 500, vus: 8 },
  { cache_hits: ['rate>0.99'] },
);

export function setup() {
  primeCache(PHRASES);
}

export default function () {
  const res = speech(pick(PHRASES));
  checkAudio(res, 'HIT');
  cacheHits.add(res.headers['X-Cache'] === 'HIT');
}
