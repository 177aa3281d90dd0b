--[[
  add_task: add a task to the tail of its board (its place is its task_id).

  KEYS[1]  task_seq            STRING highest task id handed out or given
  KEYS[2]  tasks               ZSET   every task id
  KEYS[3]  boards              SET    board names
  KEYS[4]  cfg_chains          HASH   chain -> models
  KEYS[5]  cfg_model_provider  HASH   model -> provider
  KEYS[6]  refs                HASH   chain key -> unfinished tasks
  KEYS[7]  ready_chains        SET
  KEYS[8]  ready_seq           STRING
  KEYS[9]  idx_busy            SET
  KEYS[10] idx_paused          SET
  KEYS[11] idx_backoff         ZSET
  KEYS[12] events              STREAM
  Built from ARGV[1]: task:<id>, board:<b>, board:<b>:queue, ready:<ck>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id, or "" for the next from task_seq
  ARGV[4] board  ARGV[5] title  ARGV[6] prompt  ARGV[7] chain name or ""  ARGV[8] pinned model or ""

  Returns {0, task_id} | {4, task_id} duplicate id | {5, message} unknown chain or model
          | {3, message} no auto id left below 10**14
]]
local rcall = redis.call
--- @include "core"

local K = {refs = KEYS[6], ready_chains = KEYS[7], ready_seq = KEYS[8], idx_busy = KEYS[9],
           idx_paused = KEYS[10], idx_backoff = KEYS[11], events = KEYS[12]}
local P, now, board, chain, pinned = ARGV[1], clock_ms(ARGV[2]), ARGV[4], ARGV[7], ARGV[8]

local ck
if chain ~= "" then
  if rcall("HEXISTS", KEYS[4], chain) == 0 then return {5, "unknown chain '" .. chain .. "'"} end
  ck = "c:" .. chain
else
  if rcall("HEXISTS", KEYS[5], pinned) == 0 then return {5, "unknown model '" .. pinned .. "'"} end
  ck = "m:" .. pinned
end

local id
if ARGV[3] == "" then
  id = num(rcall("GET", KEYS[1]), 0) + 1
  if id >= 100000000000000 then return {3, "task ids are exhausted (they stay below 10**14)"} end
  rcall("SET", KEYS[1], int(id))
else
  id = tonumber(ARGV[3])
  if rcall("EXISTS", task_key(P, ARGV[3])) == 1 then return {4, id} end
  if id > num(rcall("GET", KEYS[1]), 0) then rcall("SET", KEYS[1], int(id)) end
end
local sid = int(id)

rcall("HSET", task_key(P, sid), "id", sid, "board", board, "title", ARGV[5], "prompt", ARGV[6],
      "chain", chain, "model_pin", pinned, "ck", ck, "status", "up_next", "run_count", 0,
      "attempts", 0, "backoff_until", 0, "created_at", int(now), "updated_at", int(now),
      "queued_at", int(now))
rcall("ZADD", KEYS[2], id, sid)
rcall("SADD", KEYS[3], board)
rcall("ZADD", queue_key(P, board), id, sid)
rcall("HINCRBY", K.refs, ck, 1)
reindex_board(K, P, board, now)
emit(K, now, "added", {"task_id", sid, "board", board, "chain", chain, "model", pinned})
return {0, id}
