--[[
  heartbeat: extend the lease of the task's active run to now + stale_in_progress.
  Fenced: only the active run may beat. A run keeps its lease past its deadline until
  the reaper requeues it, so a late beat before that is still accepted.

  KEYS[1] task (task:<id>)          HASH
  KEYS[2] lease (task:<id>:lease)   STRING with TTL
  KEYS[3] running                   ZSET task id -> lease deadline
  KEYS[4] cfg_settings              HASH (heartbeat_ms)

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id  ARGV[4] run id

  Returns {0, lease_deadline_ms} | {1, detail} no such task | {2, detail} fenced
]]
local rcall = redis.call
--- @include "core"

local P, now, id = ARGV[1], clock_ms(ARGV[2]), ARGV[3]
local t, code, detail = active_run(P, id, ARGV[4])
if not t then return {code, detail} end
local ms = setting(rcall("HGET", KEYS[4], "heartbeat_ms"), "heartbeat_ms")
local deadline = now + ms
rcall("ZADD", KEYS[3], deadline, id)
rcall("SET", KEYS[2], ARGV[4], "PX", ms)
rcall("HSET", KEYS[1], "lease_deadline", int(deadline), "last_heartbeat", int(now))
return {0, deadline}
