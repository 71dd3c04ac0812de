#!/usr/bin/env bash
# `make loadtest`: the wrk hit path, then the miss path, against a running cluster.
# Bounded: each run lasts LOADTEST_DURATION (default 10s, at most 600s).
#   LOADTEST_URL          base URL (default http://127.0.0.1:8080, nginx's public listener)
#   LOADTEST_DURATION     per script, e.g. 10s or 2m (default 10s)
#   LOADTEST_MISS_DURATION  the miss path's own duration (default LOADTEST_DURATION): wrk only
#                         counts requests that finish in time, and a synthesis takes seconds
#   LOADTEST_THREADS      wrk threads (default 2)
#   LOADTEST_HIT_CONNECTIONS, LOADTEST_MISS_CONNECTIONS  open connections (default 8 and 2)
#   WRK_API, WRK_FORMAT, WRK_VOICE, WRK_API_KEY, WRK_TEXT  see common.lua
# Exit status: 0 when both runs finished, 2 for bad settings or a target that is not ready,
# else wrk's own status.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
url="${LOADTEST_URL:-http://127.0.0.1:8080}"
url="${url%/}"
duration="${LOADTEST_DURATION:-10s}"
miss_duration="${LOADTEST_MISS_DURATION:-$duration}"
threads="${LOADTEST_THREADS:-2}"
hit_connections="${LOADTEST_HIT_CONNECTIONS:-8}"
miss_connections="${LOADTEST_MISS_CONNECTIONS:-2}"

fail() {
  echo "loadtest: $*" >&2
  exit 2
}

[[ "$url" =~ ^https?://[^/]+$ ]] || fail "LOADTEST_URL=$url must be http(s)://host[:port]"
# Seconds in a duration like 10s or 2m, bounded to 1..600; exits 2 otherwise.
seconds_of() {
  local name="$1" value="$2" count
  [[ "$value" =~ ^([0-9]+)(s|m)?$ ]] || fail "$name=$value must look like 10s or 2m"
  count="${BASH_REMATCH[1]}"
  [[ "${BASH_REMATCH[2]}" == "m" ]] && count=$((count * 60))
  ((count >= 1 && count <= 600)) || fail "$name=$value must be 1s to 600s"
  echo "$count"
}
seconds="$(seconds_of LOADTEST_DURATION "$duration")" || exit 2
miss_seconds="$(seconds_of LOADTEST_MISS_DURATION "$miss_duration")" || exit 2
for name in threads hit_connections miss_connections; do
  value="${!name}"
  [[ "$value" =~ ^[0-9]+$ ]] && ((value >= 1 && value <= 1024)) \
    || fail "${name}=${value} must be a whole number from 1 to 1024"
done
((hit_connections >= threads && miss_connections >= threads)) \
  || fail "connections must be at least the thread count ($threads)"
command -v wrk >/dev/null || fail "wrk is not installed (Debian: apt-get install wrk)"
command -v curl >/dev/null || fail "curl is not installed (Debian: apt-get install curl)"

ready="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/readyz" || true)"
[[ "$ready" == "200" ]] || fail "$url/readyz answered '${ready:-nothing}': start the cluster (make up)"

wrk -t"$threads" -c"$hit_connections" -d"${seconds}s" --timeout 30s \
  -s "$here/hit.lua" "$url"
wrk -t"$threads" -c"$miss_connections" -d"${miss_seconds}s" --timeout 120s \
  -s "$here/miss.lua" "$url"
