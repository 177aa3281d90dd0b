--[[
  add_task: add a task to the tail of its board (its place is its task_id), or, when it is due later,
  to `scheduled` (a claim moves it to its board's queue, at its place, once it is due).

  The task hash gets only what is not known otherwise: board, title, prompt (when not empty), ck,
  status and `at`, the time it was added (ms; the task's created_at), and when given `not_before` (ms),
  `night` ("1": it may only start inside the night window) and `due_at` (while scheduled). The id is in
  the key; chain / pinned model are in ck (c:<chain> / m:<model>); run_count, attempts and
  backoff_until are 0 while absent; updated_at and queued_at are `at` while absent (broker/keys.py
  `Keys.task` lists these defaults; every reader applies them).

  KEYS[1]  task_seq            STRING highest task id handed out or given
  KEYS[2]  boards              SET    board names
  KEYS[3]  cfg_chains          HASH   chain -> models
  KEYS[4]  cfg_model_provider  HASH   model -> provider
  KEYS[5]  refs                HASH   chain key -> unfinished tasks
  KEYS[6]  ready_fronts        ZSET
  KEYS[7]  ready_seq           STRING
  KEYS[8]  idx_busy            SET
  KEYS[9]  idx_paused          SET
  KEYS[10] idx_backoff         ZSET
  KEYS[11] events              STREAM
  KEYS[12] scheduled           ZSET   task id -> due time (ms)
  KEYS[13] night_queued        ZSET   night-only tasks that went to a board queue
  KEYS[14] cfg_settings        HASH   version (the caller's due time and night rule came from that config)
  Built from ARGV[1]: task:<id>, board:<b>, board:<b>:queue, ready:<ck>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id, or "" for the next from task_seq
  ARGV[4] board  ARGV[5] title  ARGV[6] prompt  ARGV[7] chain name or ""  ARGV[8] pinned model or ""
  ARGV[9] due time (ms) or "": a task due after now waits in `scheduled` (the caller computes it from the
          not-before time and the night window)
  ARGV[10] "1" for a night-only task, else ""  ARGV[11] the not-before time asked for (ms) or ""
  ARGV[12] the config version the caller computed ARGV[9] and ARGV[10] from (absent: it computed nothing
           from the config, nothing is checked)

  Returns {0, task_id, status} | {4, task_id} duplicate id | {5, message} unknown chain or model
          | {3, message} no auto id left below 10**14 | {7} the config changed since the caller read it
]]
local rcall = redis.call
--- @include "core"

local K = {task_seq = KEYS[1], boards = KEYS[2], cfg_chains = KEYS[3], cfg_model_provider = KEYS[4],
           refs = KEYS[5], ready_fronts = KEYS[6], ready_seq = KEYS[7], idx_busy = KEYS[8],
           idx_paused = KEYS[9], idx_backoff = KEYS[10], events = KEYS[11], scheduled = KEYS[12],
           night_queued = KEYS[13]}
if ARGV[12] and (rcall("HGET", KEYS[14], "version") or "") ~= ARGV[12] then return {7} end
return new_task(K, ARGV[1], clock_ms(ARGV[2]), {
  id = ARGV[3], board = ARGV[4], title = ARGV[5], prompt = ARGV[6], chain = ARGV[7], pinned = ARGV[8],
  due = ARGV[9], night = ARGV[10], not_before = ARGV[11]})
