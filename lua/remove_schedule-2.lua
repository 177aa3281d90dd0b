--[[
  remove_schedule: delete a recurring schedule; the tasks it added stay as they are.

  KEYS[1]  schedules           ZSET   schedule id -> next firing time (ms)
  KEYS[2]  events              STREAM
  Built from ARGV[1]: schedule:<id>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] schedule id

  Returns {0} | {1, message} no such schedule
]]
local rcall = redis.call
--- @include "core"

local K = {events = KEYS[2]}
local P, now, sid = ARGV[1], clock_ms(ARGV[2]), ARGV[3]
if rcall("ZREM", KEYS[1], sid) == 0 then return {1, "no schedule " .. sid} end
local board = rcall("HGET", schedule_key(P, sid), "board")
rcall("DEL", schedule_key(P, sid))
emit(K, now, "schedule_removed", {"schedule", sid, "board", board})
return {0}
