import { record } from './record.mjs';

export function check(value, checks) {
  let all = true;
  for (const [name, predicate] of Object.entries(checks)) {
    const ok = Boolean(predicate(value));
    const counts = record.checks[name] || { pass: 0, fail: 0 };
    counts[ok ? 'pass' : 'fail'] += 1;
    record.checks[name] = counts;
    all = all && ok;
  }
  return all;
}

export function sleep() {}

export function fail(message) {
  throw new Error(message);
}

export default { check, sleep, fail };
