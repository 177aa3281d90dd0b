--[[
  fail_run: a run failed (fenced by run id). attempts + 1; with retry and attempts below
  max_attempts the task returns to its board head after the failure backoff (the board
  waits for it); otherwise it is failed for good and the board moves on. The provider's
  breaker learns of it (lib/core.lua breaker_after).

  KEYS[1]  task (task:<id>)   HASH
  KEYS[2..20] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>:runs, task:<id>:lease, board:<b>, board:<b>:queue, ready:<ck>,
  breaker:<provider>, breaker:<provider>:failures

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id  ARGV[4] run id
  ARGV[5] root cause (failed, timeout, overloaded, billing, ...)  ARGV[6] message
  ARGV[7] retry (1/0)
  ARGV[8] provider fault (1/0; absent = 0): the failure counts toward the provider's breaker
          (broker/signals.py decides which causes do); any other failure tells the provider answered

  A repeat of the failure that ended this run (its first call timed out after it was applied) changes
  nothing and answers 8 (the task keeps `last_end` = "<run id>|fail:<cause>:<sha1 of the reason>"; the
  outcome's `last_digest` is another field, so a later run's failure never hides its repeat).

  Returns {0, status, attempts} | {8, status, attempts} repeated | {1, detail} no such task
          | {2, detail} fenced
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 2)
local P, now, id = ARGV[1], clock_ms(ARGV[2]), ARGV[3]
local t, code, detail = active_run(P, id, ARGV[4])
if not t then
  local cur, what = last_report(P, id, ARGV[4])
  if code == 2 and what == "fail:" .. ARGV[5] .. ":" .. redis.sha1hex(ARGV[6]) then
    return {8, cur.status, cur.attempts}
  end
  return {code, detail}
end
local status, attempts = fail_run(K, P, id, t, now, ARGV[5], ARGV[6], ARGV[7] == "1", true,
                                 ARGV[8] == "1" and "fault" or "ok",
                                 {"last_end", ARGV[4] .. "|fail:" .. ARGV[5] .. ":" .. redis.sha1hex(ARGV[6])})
return {0, status, attempts}
