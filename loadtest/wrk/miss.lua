-- The miss path: every request's text is unique (run id, thread number and a counter in it),
-- so the gateway relays each one to a worker for synthesis (X-Cache: MISS).
--   wrk -t2 -c2 -d10s --timeout 60s -s loadtest/wrk/miss.lua http://127.0.0.1:8080
-- WRK_RUN_ID fixes the run id (default: the start time); see common.lua for the others.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local common = require("common")

common.configure(nil)

local run_id = os.getenv("WRK_RUN_ID") or tostring(os.time())
local counter = 0

setup = common.setup
response = common.response
done = common.done("miss path")

function request()
  counter = counter + 1
  local phrase = common.phrases[(counter % #common.phrases) + 1]
  local text = string.format("%s Reference %s %d %d.", phrase, run_id, id, counter)
  return wrk.format(nil, nil, nil, common.body(text))
end
