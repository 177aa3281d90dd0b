--[[
  cancel_task: move a task to cancelled from wherever it is. A run in progress loses its
  lease (its later reports are fenced) and its counters are released; a breaker's probe slot
  it held is freed.

  KEYS[1]  task (task:<id>)   HASH
  KEYS[2]  scheduled          ZSET   task id -> due time
  KEYS[3..21] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>:runs, task:<id>:lease, board:<b>, board:<b>:queue, ready:<ck>,
  breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id

  Returns {0, previous status} | {1, detail} no such task | {3, detail} already cancelled
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 3)
K.scheduled = KEYS[2]
local P, now, id = ARGV[1], clock_ms(ARGV[2]), ARGV[3]
local t = task_fields(P, id)
if not t then return {1, "task not found"} end
local was = t.status
if was == "cancelled" then return {3, "already cancelled"} end
if was == "up_next" then
  rcall("ZREM", queue_key(P, t.board), id)
elseif was == "scheduled" then
  rcall("ZREM", K.scheduled, id)
  counter_down(board_key(P, t.board), "scheduled")
  rcall("HDEL", task_key(P, id), "due_at")
elseif was == "in_progress" then
  end_run(K, P, id, t, now, "cancelled", "cancelled", finish_fields(now, "cancelled"))  -- one HSET
  breaker_after(K, P, t, now, "void")
elseif was == "in_review" then
  rcall("ZREM", K.in_review, id)
elseif was == "failed" then
  rcall("ZREM", K.failed, id)
end
finish(K, P, id, t, now, "cancelled", K.cancelled, was == "in_progress")
emit(K, now, "cancelled", {"task_id", id, "board", t.board, "run_id", t.run_id, "message", "was " .. was})
return {0, was}
