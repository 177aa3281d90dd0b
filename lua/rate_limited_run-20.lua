--[[
  rate_limited_run: the run's model answered with a rate or usage limit (fenced by run id).
  The model cools down until max(its current cooldown end, ARGV[5]) -- a cooldown never
  shrinks -- and the task returns to its board head at once without using an attempt, so
  the next claim falls to the next model of its chain. A rate limit with no parsed reset
  (ARGV[8] = 1) counts toward the provider's breaker (lib/core.lua breaker_after); one with
  a reset cools only the model and tells the provider answered.

  KEYS[1]  task (task:<id>)   HASH
  KEYS[2..20] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>:runs, task:<id>:lease, board:<b>, board:<b>:queue,
  ready:<ck>, cooldown:<model>, breaker:<provider>, breaker:<provider>:failures

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id  ARGV[4] run id
  ARGV[5] cooldown end (ms), or "" when no reset is known: now + the config's cooldown_ms
  ARGV[6] class: rate_limit | quota_reached, or auth | agent_config (the model's agent cannot run: not
           logged in, bad key, no executable)  ARGV[7] message
  ARGV[8] provider fault (1/0; absent = 0): no reset was parsed, so the limit counts toward the breaker

  A repeat of the limit that ended this run (its first call timed out after it was applied) changes
  nothing and answers 8 (the task keeps `last_end` = "<run id>|limit:<class>|<model>|<cooldown end>").

  Returns {0, model, cooldown_end_ms} | {8, model, cooldown_end_ms} repeated | {1, detail} no such task
          | {2, detail} fenced
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 2)
local P, now, id, reason, message = ARGV[1], clock_ms(ARGV[2]), ARGV[3], ARGV[6], ARGV[7]
local t, code, detail = active_run(P, id, ARGV[4])
if not t then
  local _, what = last_report(P, id, ARGV[4])
  local prefix = "limit:" .. reason .. "|"
  if code == 2 and what and string.sub(what, 1, #prefix) == prefix then
    local model, until_ms = string.match(string.sub(what, #prefix + 1), "^(.*)|(%d+)$")
    return {8, model, tonumber(until_ms)}
  end
  return {code, detail}
end

local end_ms = tonumber(ARGV[5])
if not end_ms then end_ms = now + setting(rcall("HGET", K.cfg_settings, "cooldown_ms"), "cooldown_ms") end
local until_ms = cool_model(K, P, t.model, now, end_ms, reason, true)
-- One HSET of the task hash: the run's end, the error, the report's key and the task back at its head.
local fields = {"last_error", message, "last_error_reason", reason,
                "last_end", ARGV[4] .. "|limit:" .. reason .. "|" .. t.model .. "|" .. int(until_ms)}
end_run_into(K, P, id, t, now, reason, message, fields, "up_next", 0)
record_error(K, now, reason, id, t, message)
emit(K, now, reason, {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                      "run_id", t.run_id, "until", int(until_ms), "message", message})
breaker_after(K, P, t, now, ARGV[8] == "1" and "fault" or "ok", reason)
return {0, t.model, until_ms}
