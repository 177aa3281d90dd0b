--[[
  reap_leases: requeue every in-progress task whose lease deadline has passed (its agent
  stopped heart-beating). Each goes back to its board head with no backoff, attempts + 1
  (failed after max_attempts); its run loses the lease, so a late report is refused.
  A lost lease says nothing about the provider (the worker died): a breaker's probe slot is freed.

  KEYS[1]  boards              SET    (walked only for a lease whose task hash is gone)
  KEYS[2..21] the run-end keys, in the order of RUN_END_KEYS in lib/core.lua:
           cfg_settings cfg_model_cap cfg_provider_cap blocked running inflight_model
           inflight_provider ready_fronts ready_seq idx_busy idx_paused idx_backoff refs
           in_review failed cancelled events errors stats_failures stats_completed
  Built from ARGV[1]: task:<id>, task:<id>:runs, task:<id>:lease, board:<b>,
  board:<b>:queue, ready:<ck>, breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] at most this many leases per call

  A lease whose task hash is gone (deleted by hand) is cleared from what its board says (the board
  whose `running` is the task, found in O(boards); its `run` = "<run id>|<model>|<provider>"), or, for
  a run claimed before boards kept `run`, from the open entry of its history: its counters and its board
  slot are released, event "lost".

  Returns {0, leases handled, task_id, status, task_id, status, ...} (lost tasks are not listed)
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 2)
K.boards = KEYS[1]
local P, now = ARGV[1], clock_ms(ARGV[2])
-- The task hash is gone: release what the run held. A run keeps its board, model and provider on its
-- board (`running` = its task id, `run` = "<run id>|<model>|<provider>"), found by a walk of `boards`:
-- O(boards), only on this path (a hash deleted by hand). A run claimed before `run` existed has an open
-- entry in its history instead.
local function lost(id)
  rcall("ZREM", K.running, id)
  rcall("DEL", lease_key(P, id))
  local board, run
  for _, b in ipairs(rcall("SMEMBERS", K.boards)) do
    local v = rcall("HMGET", board_key(P, b), "running", "run")
    if v[1] == id then
      board = b
      if v[2] and v[2] ~= "" then
        local run_id, model, provider = string.match(v[2], "^(.*)|([^|]*)|([^|]*)$")
        run = {board = b, run_id = run_id, model = model, provider = provider}
      end
      break
    end
  end
  if not run then
    local raw = rcall("LINDEX", runs_key(P, id), -1)
    if raw then
      local old = cjson.decode(raw)
      if not old.ended_at and old.board then run = old end
    end
  end
  if run then
    inflight_down(K, run.model, run.provider)
    breaker_after(K, P, {provider = run.provider, run_id = run.run_id}, now, "void")
    board = board or run.board
  end
  if not board then return end
  if rcall("HGET", board_key(P, board), "running") == id then
    rcall("HDEL", board_key(P, board), "running", "run")
  end
  reindex_board(K, P, board, now)
  emit(K, now, "lost", {"task_id", id, "board", board, "model", run and run.model, "run_id", run and run.run_id,
                        "message", "task hash missing: lease released"})
end

local expired = rcall("ZRANGEBYSCORE", K.running, "-inf", now, "LIMIT", 0, tonumber(ARGV[3]))
local out = {0, #expired}
for _, id in ipairs(expired) do
  local t = task_fields(P, id)
  if t and t.status == "in_progress" then
    local status = fail_run(K, P, id, t, now, "timeout", "no heartbeat: lease expired", true, false,
                           "void")
    out[#out + 1] = tonumber(id)
    out[#out + 1] = status
  elseif t then
    rcall("ZREM", K.running, id)
  else
    lost(id)
  end
end
return out
