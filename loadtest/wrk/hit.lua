-- The hit path: every request has the same body, so after the first one the gateway answers
-- from its Redis cache (X-Cache: HIT).
--   wrk -t2 -c4 -d10s -s loadtest/wrk/hit.lua http://127.0.0.1:8080
-- WRK_TEXT replaces the text; see common.lua for the other variables.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local common = require("common")

common.configure(common.body(os.getenv("WRK_TEXT") or common.phrases[1]))

setup = common.setup
response = common.response
done = common.done("hit path")
