--[[
  add_schedule: store a recurring schedule and its first firing time. The cron expression and the zone
  are checked by the caller (broker/schedules.py), which also computes the firing times.

  KEYS[1]  schedule_seq        STRING highest schedule id handed out
  KEYS[2]  schedules           ZSET   schedule id -> next firing time (ms)
  KEYS[3]  cfg_chains          HASH   chain -> models
  KEYS[4]  cfg_model_provider  HASH   model -> provider
  KEYS[5]  events              STREAM
  Built from ARGV[1]: schedule:<id>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] cron  ARGV[4] zone  ARGV[5] board
  ARGV[6] chain or ""  ARGV[7] pinned model or ""  ARGV[8] title  ARGV[9] prompt  ARGV[10] first firing (ms)

  Returns {0, schedule_id} | {5, message} unknown chain or model
]]
local rcall = redis.call
--- @include "core"

local K = {events = KEYS[5]}
local P, now, chain, pinned = ARGV[1], clock_ms(ARGV[2]), ARGV[6], ARGV[7]
local ck
if chain ~= "" then
  if rcall("HEXISTS", KEYS[3], chain) == 0 then return {5, "unknown chain '" .. chain .. "'"} end
  ck = "c:" .. chain
else
  if rcall("HEXISTS", KEYS[4], pinned) == 0 then return {5, "unknown model '" .. pinned .. "'"} end
  ck = "m:" .. pinned
end
local id = rcall("INCR", KEYS[1])
local sid = int(id)
rcall("HSET", schedule_key(P, sid), "cron", ARGV[3], "tz", ARGV[4], "board", ARGV[5], "ck", ck,
      "title", ARGV[8], "prompt", ARGV[9], "created_at", int(now))
rcall("ZADD", KEYS[2], ARGV[10], sid)
emit(K, now, "schedule_added", {"schedule", sid, "board", ARGV[5], "cron", ARGV[3], "tz", ARGV[4],
                                "next", ARGV[10]})
return {0, id}
