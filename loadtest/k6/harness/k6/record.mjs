// What a dry run saw: every HTTP request, every check, every custom metric sample.
export const record = { requests: [], checks: {}, metrics: {} };
