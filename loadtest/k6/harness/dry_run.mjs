// Dry-run a k6 script under node: k6's modules are stubs that record requests instead of
// sending them. Prints one JSON document (options, requests, checks, metrics) on stdout.
//   node loadtest/k6/harness/dry_run.mjs loadtest/k6/hits.js [iterations]
// Environment variables reach the script as __ENV, as with `k6 run -e`.
import { readFileSync } from 'node:fs';
import { register } from 'node:module';
import { pathToFileURL } from 'node:url';

register('./hooks.mjs', import.meta.url);

const [script, iterationsArg] = process.argv.slice(2);
if (!script) {
  console.error('usage: dry_run.mjs SCRIPT [ITERATIONS]');
  process.exit(2);
}
const iterations = Number(iterationsArg || 3);

globalThis.__ENV = { ...process.env };
globalThis.__VU = 1;
globalThis.__ITER = 0;
globalThis.open = (path, mode) => {
  const data = readFileSync(path);
  return mode === 'b' ? data.buffer.slice(data.byteOffset, data.byteOffset + data.length) : data.toString();
};

const { record } = await import('./k6/record.mjs');
const module = await import(pathToFileURL(script).href);
if (typeof module.default !== 'function') {
  throw new Error(`${script} has no default function`);
}
const data = typeof module.setup === 'function' ? await module.setup() : undefined;
const setupRequests = record.requests.length;
for (let i = 0; i < iterations; i += 1) {
  globalThis.__ITER = i;
  await module.default(data);
}
if (typeof module.teardown === 'function') {
  await module.teardown(data);
}
process.stdout.write(
  JSON.stringify({ options: module.options || {}, setup_requests: setupRequests, ...record }, null, 2),
);
