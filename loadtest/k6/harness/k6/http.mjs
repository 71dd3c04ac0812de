// A recording stand-in for k6/http: requests are recorded, never sent, and answered with
// canned responses shaped like the gateway's (an engine without cloning; an audio cache that
// hits on a body seen before).
import { record } from './record.mjs';

const encoder = new TextEncoder();
const cached = new Set();

function toBuffer(text) {
  const bytes = encoder.encode(text);
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
}

function describeBody(body) {
  if (body === undefined || body === null) {
    return { kind: 'none' };
  }
  if (typeof body === 'string') {
    try {
      return { kind: 'json', fields: JSON.parse(body) };
    } catch {
      return { kind: 'text', text: body };
    }
  }
  const fields = {};
  const files = [];
  for (const [name, value] of Object.entries(body)) {
    if (value && value.__k6File) {
      files.push(name);
      fields[name] = {
        filename: value.filename,
        content_type: value.content_type,
        bytes: value.bytes,
        base64: value.base64,
      };
    } else {
      fields[name] = value;
    }
  }
  return { kind: files.length ? 'multipart' : 'form', fields, files };
}

function respond(method, url, body, params) {
  const path = new URL(url).pathname;
  const requestHeaders = (params && params.headers) || {};
  if (method === 'GET' && path === '/v1/models') {
    const body = JSON.stringify({
      object: 'list',
      data: [{ id: 'tts-1', object: 'model', capabilities: { supports_cloning: false } }],
    });
    return { status: 200, headers: { 'Content-Type': 'application/json' }, body: toBuffer(body), text: body };
  }
  if (path === '/synthesize') {
    const body = JSON.stringify({ error: { code: 'prompt_unsupported', message: 'no cloning' } });
    return { status: 422, headers: { 'Content-Type': 'application/json' }, body: toBuffer(body), text: body };
  }
  let cache = 'BYPASS';
  if (requestHeaders['Cache-Control'] !== 'no-cache') {
    cache = cached.has(body) ? 'HIT' : 'MISS';
    cached.add(body);
  }
  return {
    status: 200,
    headers: { 'Content-Type': 'audio/pcm', 'X-Sample-Rate': '24000', 'X-Cache': cache },
    body: new ArrayBuffer(4800),
    text: null,
  };
}

function request(method, url, body, params) {
  if (typeof url !== 'string' || !/^https?:\/\//.test(url)) {
    throw new Error(`k6 needs an absolute URL, got ${url}`);
  }
  record.requests.push({
    method,
    url,
    body: describeBody(body),
    headers: (params && params.headers) || {},
    tags: (params && params.tags) || {},
    response_type: (params && params.responseType) || 'text',
    expected_statuses: (params && params.responseCallback && params.responseCallback.statuses) || null,
  });
  const canned = respond(method, url, body, params);
  return {
    status: canned.status,
    headers: canned.headers,
    body: params && params.responseType === 'binary' ? canned.body : canned.text,
    timings: { waiting: 1, duration: 2 },
    json(selector) {
      const parsed = JSON.parse(canned.text);
      return selector ? parsed[selector] : parsed;
    },
  };
}

export function get(url, params) {
  return request('GET', url, null, params);
}

export function post(url, body, params) {
  return request('POST', url, body, params);
}

export function file(data, filename, contentType) {
  const buffer = typeof data === 'string' ? Buffer.from(data) : Buffer.from(new Uint8Array(data));
  return {
    __k6File: true,
    filename,
    content_type: contentType,
    bytes: buffer.length,
    base64: buffer.toString('base64'),
  };
}

export function expectedStatuses(...statuses) {
  return { statuses };
}

export default { get, post, file, expectedStatuses, request };
