--[[
  claim_task: claim at most one task, atomically enforcing every queue rule.

  Rules, in order:
    1. global cap: tasks in progress < ARGV[4] (the day or night cap in force);
    2. one task per board, strict head of line: only a board's lowest up_next task_id
       may run; a paused board or a head in failure backoff is not eligible;
    3. model choice: the first model of the head's chain (or its pinned model) that is
       not cooling down, is under its model cap and whose provider is under its cap and
       whose provider's breaker is closed -- or half-open with no probe out: then this run
       is the probe, the only run on that provider until it ends;
    4. fairness: among eligible boards, the one longest in its ready line goes first.
  Cost: boards are indexed by the chain key of their head (ready:<ck>); all boards of a
  line share the same model choice, and ready:fronts holds each line's front place, so the
  claim reads the C fronts in one call, takes the first line with a usable model and reads
  that line's front board -- O(C + log N) for C chain keys in use (bounded by the config),
  never a board scan. Model choice reads the `blocked` index (lib/core.lua) once; skip counts
  are read only when refusing.

  KEYS[1]  cfg_claim           STRING what a claim reads of the config, JSON: version, lease_ms, model ->
                                      provider, chains, model and provider caps (lib/core.lua read_claim_config)
  KEYS[2]  inflight_model      HASH   model -> runs in progress
  KEYS[3]  inflight_provider   HASH   provider -> runs in progress
  KEYS[4]  blocked             HASH   m:<model> / p:<provider> / c:<model> / o:<provider> -> why it may not run
  KEYS[5]  running             ZSET   task id -> lease deadline
  KEYS[6]  ready_fronts        ZSET   chain key -> place of its ready line's front board
  KEYS[7]  ready_seq           STRING round-robin counter
  KEYS[8]  idx_busy            SET
  KEYS[9]  idx_paused          SET
  KEYS[10] idx_backoff         ZSET   board -> backoff end
  KEYS[11] events              STREAM
  KEYS[12] stats_skips         HASH   reason -> total
  KEYS[13] stats_claims        STRING
  KEYS[14] scheduled           ZSET   task id -> due time (ms)
  KEYS[15] night_queued        ZSET   night-only tasks that went to a board queue
  Built from ARGV[1]: ready:<ck>, board:<b>, board:<b>:queue, task:<id>, task:<id>:lease,
  breaker:<provider> (the probe of a half-open breaker)

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] run id (new UUID)  ARGV[4] global cap
  ARGV[5] night (1/0)  ARGV[6] config version the caller computed ARGV[4] and ARGV[7] from
  ARGV[7] "" while night-only tasks may start (the night window is open, or night mode is off), else
          when the window next opens (ms)
  ARGV[8..] more run ids: one claim per run id while the rules allow (a dispatcher claims a batch)

  Returns
    {0, n, task_id, board, model, provider, run_id, run_count, attempt, lease_deadline_ms, ...,
     reason, count, ...}                     n >= 1 claims of 8 fields each; then, when the rules
                                             stopped the batch before its last run id, the skip
                                             reasons of the boards left waiting
    {6, reason, count, reason, count, ...}   nothing claimable (skip reasons by board)
    {7}                                      config changed since the caller read it
  A missing or unreadable cfg_claim, or one without lease_ms, is an error, before anything is written.
]]
local rcall = redis.call
--- @include "core"

local K = {cfg_claim = KEYS[1], inflight_model = KEYS[2], inflight_provider = KEYS[3], blocked = KEYS[4],
           running = KEYS[5], ready_fronts = KEYS[6], ready_seq = KEYS[7], idx_busy = KEYS[8],
           idx_paused = KEYS[9], idx_backoff = KEYS[10], events = KEYS[11], stats_skips = KEYS[12],
           stats_claims = KEYS[13], scheduled = KEYS[14], night_queued = KEYS[15]}
local P = ARGV[1]
local now = clock_ms(ARGV[2])

K.conf = read_claim_config(K.cfg_claim)
if int(K.conf.version) ~= ARGV[6] then return {7} end
local lease_ms = setting(K.conf.lease_ms, "lease_ms")  -- before any write: a missing setting changes nothing

-- Boards whose backoff ended join their ready line (the broker's delayed work, atomic with claims).
local due = rcall("ZRANGEBYSCORE", K.idx_backoff, "-inf", int(now), "LIMIT", "0", "100")
for _, b in ipairs(due) do reindex_board(K, P, b, now) end

-- The night rule: outside the window (night_next ~= ""), no night-only run starts. Night-only tasks
-- that reached a board queue go back to `scheduled` until the window opens; a due night-only task
-- waits for it there. night_queued also keeps the night-only tasks in progress (a run that is going
-- when the window closes is not stopped; its task is checked again once it is back in its queue) and
-- forgets the finished ones here.
local night_next = ARGV[7] or ""
if night_next ~= "" then
  for _, id in ipairs(rcall("ZRANGE", K.night_queued, "0", "-1")) do
    local t = rcall("HMGET", task_key(P, id), "board", "status")
    if t[2] == "up_next" then
      rcall("ZREM", queue_key(P, t[1]), id)
      schedule_task(K, P, id, t[1], night_next)
      reindex_board(K, P, t[1], now)
      emit(K, now, "scheduled", {"task_id", id, "board", t[1], "due", night_next,
                                 "message", "night-only: the night window is closed"})
    end
    if t[2] ~= "in_progress" then rcall("ZREM", K.night_queued, id) end
  end
end

-- Scheduled tasks that are due join their board queues at their places (their ids), O(log N) each.
for _, id in ipairs(rcall("ZRANGEBYSCORE", K.scheduled, "-inf", int(now), "LIMIT", "0", "100")) do
  local t = rcall("HMGET", task_key(P, id), "board", "night")
  if not t[1] then
    rcall("ZREM", K.scheduled, id)  -- no hash (doctor reports it): nothing to queue
  elseif t[2] == "1" and night_next ~= "" then
    rcall("ZADD", K.scheduled, night_next, id)
    rcall("HSET", task_key(P, id), "due_at", night_next)
  else
    rcall("ZREM", K.scheduled, id)
    counter_down(board_key(P, t[1]), "scheduled")
    rcall("ZADD", queue_key(P, t[1]), id, id)
    rcall("HSET", task_key(P, id), "status", "up_next", "queued_at", int(now))
    rcall("HDEL", task_key(P, id), "due_at")
    if t[2] == "1" then rcall("ZADD", K.night_queued, id, id) end
    reindex_board(K, P, t[1], now)
    emit(K, now, "due", {"task_id", id, "board", t[1]})
  end
end

-- Nothing claimable: every waiting board counts once, under the reason it waits for.
-- lines: {chain key, reason} for the ready lines that were refused.
local function refuse(lines)
  local reasons = {}
  local function count(reason, n)
    if n > 0 then reasons[reason] = (reasons[reason] or 0) + n end
  end
  for _, line in ipairs(lines) do count(line[2], rcall("ZCARD", ready_key(P, line[1]))) end
  count("board_busy", rcall("SCARD", K.idx_busy))
  count("board_paused", rcall("SCARD", K.idx_paused))
  count("backoff", rcall("ZCARD", K.idx_backoff))
  local out = {6}
  for reason, n in pairs(reasons) do
    out[#out + 1] = reason
    out[#out + 1] = n
    rcall("HINCRBY", K.stats_skips, reason, n)
  end
  return out
end

-- The ready line whose front board waited longest among the lines with a usable model (rules 3, 4):
-- its chain key, board, model and provider; else nil and the refused lines. Model choice lives in
-- lib/core.lua (pick_model, shared with explain_boards).
local function choose(fronts, view)
  local refused = {}
  for _, ck in ipairs(fronts) do
    local model, provider, reason = pick_model(view, now, ck)
    if not model then
      refused[#refused + 1] = {ck, reason}
    else
      local front = rcall("ZRANGE", ready_key(P, ck), "0", "1", "WITHSCORES")  -- the front and the board behind
      if front[1] then
        return {ck = ck, board = front[1], next_place = front[4], model = model, provider = provider}
      end
      rcall("ZREM", K.ready_fronts, ck)  -- an empty line listed (doctor reports how): skip it
    end
  end
  return nil, refused
end

local deadline = now + lease_ms
local now_s, deadline_s, lease_s = int(now), int(deadline), int(lease_ms)  -- as text, once

-- Claim the head of board `best.board` for run `run_id`; its reply fields go on `out`.
-- Returns whether a model or provider became blocked (a half-open breaker's probe blocks its provider).
local function take(best, run_id, out, view)
  local b, model, provider = best.board, best.model, best.provider
  local id = rcall("ZPOPMIN", queue_key(P, b))[1]
  local tk = task_key(P, id)
  local t = rcall("HMGET", tk, "run_count", "attempts")
  local run_count = num(t[1], 0) + 1
  local attempt = num(t[2], 0) + 1
  rcall("ZADD", K.running, deadline_s, id)
  local blocked_m = note_inflight(K, "m", model, rcall("HINCRBY", K.inflight_model, model, "1"), true)
  local blocked_p = note_inflight(K, "p", provider, rcall("HINCRBY", K.inflight_provider, provider, "1"), true)
  local probe = view.blocked["o:" .. provider] ~= nil
  rcall("HSET", tk, "status", "in_progress", "run_id", run_id, "model", model, "provider", provider,
        "claimed_at", now_s, "lease_deadline", deadline_s, "backoff_until", "0", "updated_at", now_s,
        "probe", probe and "1" or "0", "night_run", ARGV[5] == "1" and "1" or "0")
  rcall("SET", lease_key(P, id), run_id, "PX", lease_s)
  rcall("INCR", K.stats_claims)
  board_claimed(K, P, b, best.ck, id, now, best.next_place, run_id .. "|" .. model .. "|" .. provider)
  if probe then breaker_probe(K, P, provider, now, run_id, id) end
  emit(K, now, "claimed", {"task_id", id, "board", b, "model", model, "provider", provider,
                           "run_id", run_id, "run_count", run_count, "attempt", attempt})
  for _, v in ipairs({tonumber(id), b, model, provider, run_id, run_count, attempt, deadline}) do
    out[#out + 1] = v
  end
  return blocked_m or blocked_p or probe
end

-- One claim per run id, while the global cap and the rules allow. When they stop the batch, the boards
-- left waiting are counted under their reasons, as a refused claim counts them.
local cap, running = tonumber(ARGV[4]), rcall("ZCARD", K.running)
local fronts = rcall("ZRANGE", K.ready_fronts, "0", "-1")
local out, view = {0, 0}, nil
local function stop(refused)
  if out[2] == 0 then return refuse(refused) end
  local skips = refuse(refused)
  for j = 2, #skips do out[#out + 1] = skips[j] end
  return out
end
local extra = math.max(0, #ARGV - 7)  -- run ids after ARGV[3]
for i = 0, extra do
  if running >= cap then
    local lines = {}
    for _, ck in ipairs(fronts) do lines[#lines + 1] = {ck, "global_cap"} end
    return stop(lines)
  end
  view = view or model_view(K, K.conf)
  local best, refused = choose(fronts, view)
  if not best then return stop(refused) end
  if take(best, i == 0 and ARGV[3] or ARGV[7 + i], out, view) then view = nil end
  out[2] = out[2] + 1
  running = running + 1
  if i < extra then fronts = rcall("ZRANGE", K.ready_fronts, "0", "-1") end
end
return out
