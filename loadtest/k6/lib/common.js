// Shared settings and helpers of the k6 scenarios. Every knob is an environment variable
// (k6 run -e NAME=value ...); the defaults target the local cluster started by `make up`.
import http from 'k6/http';
import { check } from 'k6';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
export const API_KEY = __ENV.API_KEY || '';
export const MODEL = __ENV.MODEL || 'tts-1';
export const VOICE = __ENV.VOICE || 'alloy';
export const FORMAT = __ENV.FORMAT || 'pcm';

export const PHRASES = [
  'Your order has shipped and will arrive on Tuesday.',
  'Please hold while we connect you to the next available agent.',
  'The meeting has been moved to three o\'clock this afternoon.',
  'Thank you for calling. How can I help you today?',
  'Turn left at the next intersection, then continue for two hundred meters.',
  'Your verification code has been sent to the phone number on file.',
  'The weather tomorrow will be mostly sunny with a light breeze.',
  'We could not process your payment. Please check your card details.',
];

// A per-run tag, so unique texts never collide with a previous run's cache entries.
export const RUN_ID = __ENV.RUN_ID || `${Date.now().toString(36)}`;

export function envNumber(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') {
    return fallback;
  }
  const value = Number(raw);
  if (!Number.isFinite(value)) {
    throw new Error(`${name}=${raw} is not a number`);
  }
  return value;
}

// Closed-loop load: VUS virtual users for DURATION, each sending its next request when the
// last one ends. `defaults` sets the scenario's own p95/p99 budgets in milliseconds.
export function loadOptions(name, defaults, extraThresholds = {}) {
  const p95 = envNumber('P95_MS', defaults.p95);
  const p99 = envNumber('P99_MS', defaults.p99);
  const maxErrorRate = envNumber('MAX_ERROR_RATE', 0.01);
  return {
    scenarios: {
      [name]: {
        executor: 'constant-vus',
        vus: envNumber('VUS', defaults.vus || 4),
        duration: __ENV.DURATION || defaults.duration || '30s',
        gracefulStop: '30s',
      },
    },
    // Thresholds count measured requests only (tag phase:measure), not setup()'s.
    thresholds: {
      'http_req_failed{phase:measure}': [`rate<${maxErrorRate}`],
      'http_req_duration{phase:measure}': [`p(95)<${p95}`, `p(99)<${p99}`],
      checks: [`rate>${1 - maxErrorRate}`],
      ...extraThresholds,
    },
    summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  };
}

export function headers(extra = {}) {
  const result = { ...extra };
  if (API_KEY) {
    result.Authorization = `Bearer ${API_KEY}`;
  }
  return result;
}

// POST /v1/audio/speech (OpenAI-compatible). `noCache` sends Cache-Control: no-cache so the
// gateway synthesizes even when the text is cached.
export function speech(text, { noCache = false, tags = {}, format = FORMAT } = {}) {
  const body = {
    model: MODEL,
    input: text,
    voice: VOICE,
    response_format: format,
    stream_format: 'audio',
  };
  const extra = { 'Content-Type': 'application/json' };
  if (noCache) {
    extra['Cache-Control'] = 'no-cache';
  }
  return http.post(`${BASE_URL}/v1/audio/speech`, JSON.stringify(body), {
    headers: headers(extra),
    responseType: 'binary',
    timeout: __ENV.REQUEST_TIMEOUT || '120s',
    tags: { endpoint: 'speech', phase: 'measure', ...tags },
  });
}

export function uniqueText(index) {
  const phrase = PHRASES[index % PHRASES.length];
  return `${phrase} Reference ${RUN_ID} ${__VU} ${__ITER}.`;
}

export function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

// Checks that a response is audio; `cache` names the X-Cache value expected, if any.
export function checkAudio(res, cache) {
  const checks = {
    'status is 200': (r) => r.status === 200,
    'body has audio': (r) => r.body !== null && r.body.byteLength > 0,
  };
  if (cache) {
    checks[`X-Cache is ${cache}`] = (r) => r.headers['X-Cache'] === cache;
  }
  return check(res, checks);
}

// Requests every phrase once so that later requests for them are cache hits.
export function primeCache(phrases) {
  for (const phrase of phrases) {
    const res = speech(phrase, { tags: { phase: 'prime' } });
    if (res.status !== 200) {
      throw new Error(`priming the cache failed: ${res.status} for ${JSON.stringify(phrase)}`);
    }
  }
}
