--[[
  reap_leases: requeue every in-progress task whose lease deadline has passed (its agent
  stopped heart-beating). Each goes back to its board head with no backoff, attempts + 1
  (failed after max_attempts); its run loses the lease, so a late report is refused.
  A lost lease says nothing about the provider (the worker died): a breaker's probe slot is freed.

  KEYS[1..19] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>, task:<id>:runs, task:<id>:lease, board:<b>,
  board:<b>:queue, ready:<ck>, breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] at most this many leases per call

  A lease whose task hash is gone (deleted by hand) is released in O(1) from what outlives the hash: the
  task's history names its board (the open entry of a run claimed before history was written at a run's
  end, or any earlier entry: a task never changes board), and the board's `run` names the run's model and
  provider: its counters and its board slot are released, event "lost". A task's first run leaves no
  trace outside its hash: its lease is dropped, event "lost" and an error in health say so, and
  `clawq doctor --repair` frees its board slot and counters (it rebuilds both from the task hashes).

  Returns {0, leases handled, task_id, status, task_id, status, ...} (lost tasks are not listed)
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 1)
local P, now = ARGV[1], clock_ms(ARGV[2])
-- The task hash is gone: release what the run held, from its history and its board (see the header).
local function lost(id)
  rcall("ZREM", K.running, id)
  rcall("DEL", lease_key(P, id))
  local board, run
  local raw = rcall("LINDEX", runs_key(P, id), -1)
  if raw then
    local last = cjson.decode(raw)
    board = last.board
    if not last.ended_at and last.board then run = last end
  end
  if board and not run then
    local v = rcall("HMGET", board_key(P, board), "running", "run")
    if v[1] == id and v[2] and v[2] ~= "" then
      local run_id, model, provider = string.match(v[2], "^(.*)|([^|]*)|([^|]*)$")
      run = {board = board, run_id = run_id, model = model, provider = provider}
    end
  end
  if not board then
    local message = "task hash missing while it ran: lease released; its board slot and counters are held until "
                    .. "clawq doctor --repair"
    record_error(K, now, "lost", id, {board = ""}, message)
    emit(K, now, "lost", {"task_id", id, "message", message})
    return
  end
  if run then
    inflight_down(K, run.model, run.provider)
    breaker_after(K, P, {provider = run.provider, run_id = run.run_id}, now, "void")
  end
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
