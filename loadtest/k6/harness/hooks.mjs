// Module resolution hooks for dry runs under node: k6's built-in modules resolve to the
// recording stubs next to this file.
const STUBS = {
  k6: new URL('./k6/index.mjs', import.meta.url).href,
  'k6/http': new URL('./k6/http.mjs', import.meta.url).href,
  'k6/metrics': new URL('./k6/metrics.mjs', import.meta.url).href,
};

export async function resolve(specifier, context, nextResolve) {
  if (Object.hasOwn(STUBS, specifier)) {
    return { url: STUBS[specifier], shortCircuit: true };
  }
  if (specifier.startsWith('k6/') || specifier.startsWith('https://')) {
    throw new Error(`dry run has no stub for ${specifier}`);
  }
  return nextResolve(specifier, context);
}
