--[[
  release_run: give a claimed run back without using an attempt (fenced by run id): the
  dispatcher could not hand it to a worker, or the agent runtime was unreachable or refused
  this client (pairing). The task returns to its board head at once; no backoff, no cooldown.
  A released run tells nothing about its provider: a breaker's probe slot is freed. When the
  agent runtime itself failed (ARGV[7] > 0), claims are held that long in the same call
  (gate:agent, read by the dispatcher before it claims).

  KEYS[1]  task (task:<id>)   HASH
  KEYS[2]  agent_gate         STRING why claims are held, with its TTL
  KEYS[3..21] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>:runs, task:<id>:lease, board:<b>, board:<b>:queue, ready:<ck>,
  breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id  ARGV[4] run id
  ARGV[5] reason (released, pairing, agent_unreachable, ...)  ARGV[6] message
  ARGV[7] hold claims for this many ms (0: no hold)

  A repeat of the release that ended this run (its first call timed out after it was applied) changes
  nothing and answers 8 (the task keeps `last_end` = "<run id>|release:<reason>").

  Returns {0, "up_next"} | {8, status} repeated | {1, detail} no such task | {2, detail} fenced
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 3)
local P, now, id, reason, message = ARGV[1], clock_ms(ARGV[2]), ARGV[3], ARGV[5], ARGV[6]
local t, code, detail = active_run(P, id, ARGV[4])
if not t then
  local cur, what = last_report(P, id, ARGV[4])
  if code == 2 and what == "release:" .. reason then return {8, cur.status} end
  return {code, detail}
end
-- One HSET of the task hash: the run's end, the report's key, the error (unless a plain release), the queue.
local fields = {"last_end", ARGV[4] .. "|release:" .. reason}
if reason ~= "released" then
  for _, v in ipairs({"last_error", message, "last_error_reason", reason}) do fields[#fields + 1] = v end
end
end_run_into(K, P, id, t, now, reason, message, fields, "up_next", 0)
if reason ~= "released" then record_error(K, now, reason, id, t, message) end
local hold_ms = tonumber(ARGV[7]) or 0
if hold_ms > 0 then rcall("SET", KEYS[2], string.sub(reason .. ": " .. message, 1, 500), "PX", hold_ms) end
emit(K, now, "released", {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                          "run_id", t.run_id, "reason", reason, "message", message})
breaker_after(K, P, t, now, "void")
return {0, "up_next"}
