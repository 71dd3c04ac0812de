// The seed service's call: POST /synthesize, multipart form with a prompt recording upload
// (k6's http.file), its transcript, text and format.
//
// Whether the prompt can be used depends on the engine behind the gateway. setup() asks
// GET /v1/models: when the engine supports cloning, every request must stream audio (200);
// when it does not (the default Piper engine), every request must be refused before any audio
// with 422 and error code "prompt_unsupported" -- that refusal is the expected, passing
// outcome, and http_req_failed does not count it. Set EXPECT=audio or
// EXPECT=prompt_unsupported to skip the question.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e VUS=2 loadtest/k6/multipart.js
//   k6 run -e PROMPT_FILE=/path/to/prompt.wav -e PROMPT_TEXT="what it says" ... multipart.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, PHRASES, headers, loadOptions, pick } from './lib/common.js';
import { synthPromptWav } from './lib/prompt.js';

const PROMPT = __ENV.PROMPT_FILE ? open(__ENV.PROMPT_FILE, 'b') : synthPromptWav();
const PROMPT_NAME = __ENV.PROMPT_FILE ? __ENV.PROMPT_FILE.split('/').pop() : 'prompt.wav';
const PROMPT_TEXT = __ENV.PROMPT_TEXT || 'This is a short prompt recording.';
const refusals = new Counter('prompt_unsupported_refusals');
// Made once, as k6 advises for per-request response callbacks.
const EXPECT_AUDIO = http.expectedStatuses(200);
const EXPECT_REFUSAL = http.expectedStatuses(422);

export const options = loadOptions('multipart', { p95: 8000, p99: 15000, vus: 2 });

export function setup() {
  if (__ENV.EXPECT) {
    if (__ENV.EXPECT !== 'audio' && __ENV.EXPECT !== 'prompt_unsupported') {
      throw new Error(`EXPECT=${__ENV.EXPECT}: use audio or prompt_unsupported`);
    }
    return { expect: __ENV.EXPECT };
  }
  const res = http.get(`${BASE_URL}/v1/models`, { headers: headers(), tags: { phase: 'setup' } });
  if (res.status !== 200) {
    throw new Error(`GET /v1/models answered ${res.status}`);
  }
  const models = res.json('data') || [];
  const cloning = models.some((m) => m.capabilities && m.capabilities.supports_cloning);
  return { expect: cloning ? 'audio' : 'prompt_unsupported' };
}

export default function (data) {
  const form = {
    text: pick(PHRASES),
    prompt_audio: http.file(PROMPT, PROMPT_NAME, 'audio/wav'),
    prompt_text: PROMPT_TEXT,
    format: __ENV.FORMAT || 'wav',
  };
  const expectAudio = data.expect === 'audio';
  const res = http.post(`${BASE_URL}/synthesize`, form, {
    headers: headers(),
    responseType: 'binary',
    timeout: __ENV.REQUEST_TIMEOUT || '120s',
    responseCallback: expectAudio ? EXPECT_AUDIO : EXPECT_REFUSAL,
    tags: { endpoint: 'synthesize', phase: 'measure' },
  });
  if (expectAudio) {
    check(res, {
      'status is 200': (r) => r.status === 200,
      'body has audio': (r) => r.body !== null && r.body.byteLength > 0,
    });
    return;
  }
  check(res, {
    'status is 422': (r) => r.status === 422,
    'code is prompt_unsupported': (r) => errorCode(r) === 'prompt_unsupported',
  });
  refusals.add(1);
}

function errorCode(res) {
  try {
    return JSON.parse(String.fromCharCode(...new Uint8Array(res.body))).error.code;
  } catch (e) {
    return `unparsable error body (${e})`;
  }
}
