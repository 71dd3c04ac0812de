-- Shared by the wrk scripts: request bodies for each API, per-thread status and X-Cache
-- counts, and a done() that prints latency percentiles and error counts.
--
-- Environment: WRK_API=openai (POST /v1/audio/speech, default) or worker (POST /v1/synthesize);
-- WRK_FORMAT (default pcm for openai, pcm_f32le for worker); WRK_VOICE; WRK_API_KEY.
local M = {}

M.phrases = {
  "Your order has shipped and will arrive on Tuesday.",
  "Please hold while we connect you to the next available agent.",
  "The meeting has been moved to three o'clock this afternoon.",
  "Thank you for calling. How can I help you today?",
  "Turn left at the next intersection, then continue for two hundred meters.",
  "Your verification code has been sent to the phone number on file.",
  "The weather tomorrow will be mostly sunny with a light breeze.",
  "We could not process your payment. Please check your card details.",
}

M.api = os.getenv("WRK_API") or "openai"
local paths = { openai = "/v1/audio/speech", worker = "/v1/synthesize" }
if not paths[M.api] then
  error("WRK_API=" .. M.api .. " is not openai or worker")
end
M.format = os.getenv("WRK_FORMAT") or (M.api == "openai" and "pcm" or "pcm_f32le")
M.voice = os.getenv("WRK_VOICE")

local function json_string(text)
  local escaped = text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

-- The JSON body that asks the configured API for `text`.
function M.body(text)
  local fields
  if M.api == "openai" then
    fields = {
      '"model":"tts-1"',
      '"input":' .. json_string(text),
      '"voice":' .. json_string(M.voice or "alloy"),
      '"response_format":' .. json_string(M.format),
    }
  else
    fields = { '"text":' .. json_string(text), '"format":' .. json_string(M.format) }
    if M.voice then
      table.insert(fields, '"voice":' .. json_string(M.voice))
    end
  end
  return "{" .. table.concat(fields, ",") .. "}"
end

-- Sets wrk's method, path and headers; call once at the top of a script.
function M.configure(body)
  wrk.method = "POST"
  wrk.path = paths[M.api]
  wrk.headers["Content-Type"] = "application/json"
  local key = os.getenv("WRK_API_KEY")
  if key and key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
  end
  wrk.body = body
end

local threads = {}

-- setup(thread), in wrk's main state: number the threads and keep them for done().
function M.setup(thread)
  thread:set("id", #threads + 1)
  thread:set("statuses", {})
  thread:set("caches", {})
  table.insert(threads, thread)
end

-- response(), in each thread's state: count statuses and X-Cache values.
function M.response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  local cache = headers["X-Cache"] or headers["x-cache"]
  if cache then
    caches[cache] = (caches[cache] or 0) + 1
  end
end

local function merged(name)
  local total = {}
  for _, thread in ipairs(threads) do
    for key, count in pairs(thread:get(name) or {}) do
      total[key] = (total[key] or 0) + count
    end
  end
  local keys = {}
  for key in pairs(total) do
    table.insert(keys, key)
  end
  table.sort(keys)
  local parts = {}
  for _, key in ipairs(keys) do
    table.insert(parts, key .. "=" .. total[key])
  end
  return #parts > 0 and table.concat(parts, " ") or "none"
end

-- done(), in the main state: one block of figures, latencies in milliseconds.
function M.done(name)
  return function(summary, latency, requests)
    local seconds = summary.duration / 1e6
    local errors = summary.errors
    io.write(string.format("--- %s (%s api) ---\n", name, M.api))
    io.write(string.format("requests    %d in %.2f s, %.2f req/s\n",
      summary.requests, seconds, summary.requests / seconds))
    io.write(string.format(
      "latency ms  p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f\n",
      latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
      latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3,
      latency.max / 1e3, latency.mean / 1e3))
    io.write(string.format("statuses    %s\n", merged("statuses")))
    io.write(string.format("x-cache     %s\n", merged("caches")))
    io.write(string.format(
      "errors      connect %d  read %d  write %d  timeout %d  non-2xx/3xx %d\n",
      errors.connect, errors.read, errors.write, errors.timeout, errors.status))
  end
end

return M
