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
  never a board scan. A batch reads the fronts once and each line it takes from once (as many
  boards as it may still claim), and writes what its claims share once, at its end (flush).
  Model choice reads the `blocked` index (lib/core.lua) once; skip counts are read only when
  refusing.

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

-- What the claims of one call write to the same keys is gathered here and written once, by flush(), which
-- runs once, before the skips are counted and the reply: the boards the claims took from each ready line (one
-- ZREMRANGEBYRANK per line: they are its first members, nothing else joins or leaves a line during the claims),
-- the lines' new fronts (one ZADD or ZREM each), the runs' leases in `running` (one ZADD), the boards that went
-- busy (one SADD), the claims count (one INCRBY) and the model and provider counters (one HINCRBY each after
-- the first). Nothing in this call reads those keys before flush(). So a batch costs what one claim costs, plus
-- what each claim writes to its own task and board. The fronts are read once per call, and each line once,
-- on first use: as many boards as the call may still claim, and the one behind them. Few tables are made
-- (each costs the script an allocation and its collection): flat lists, the replies themselves.
local fronts = rcall("ZRANGE", K.ready_fronts, "0", "-1", "WITHSCORES")  -- ck, place, ...: front first
local lines, at, touched = {}, {}, {}  -- ck -> its ZRANGE reply (board, place, ...), its next board's index; lines moved
local ran, busy, counts = {}, {}, {}  -- ZADD running's arguments; boards gone busy; hash, name, n, +n
-- A single claim (no more run ids) writes at once, as it would at flush(): gathering costs the script more
-- Lua work than the calls it saves when there is only one claim to gather.
local extra = math.max(0, #ARGV - 7)  -- run ids after ARGV[3]
local batch = extra > 0

-- Line `ck`'s front moved to `next_place` (its place as text; nil: the line is empty): fronts stays in order.
local function move_front(ck, next_place)
  for j = 1, #fronts, 2 do
    if fronts[j] == ck then
      table.remove(fronts, j)
      table.remove(fronts, j)
      break
    end
  end
  if next_place then
    local slot, p = #fronts + 1, tonumber(next_place)
    for j = 2, #fronts, 2 do
      if tonumber(fronts[j]) > p then
        slot = j - 1
        break
      end
    end
    table.insert(fronts, slot, next_place)
    table.insert(fronts, slot, ck)
  end
  for _, c in ipairs(touched) do
    if c == ck then return end
  end
  touched[#touched + 1] = ck
end

-- inflight:<kind> (hash) of `name` plus one: the first move of a name in this call is written at once (its
-- reply is the base), later ones only counted, then written by flush(). Returns the new value.
local function count_up(hash, name)
  if not batch then return rcall("HINCRBY", hash, name, "1") end
  for j = 1, #counts, 4 do
    if counts[j] == hash and counts[j + 1] == name then
      counts[j + 2], counts[j + 3] = counts[j + 2] + 1, counts[j + 3] + 1
      return counts[j + 2]
    end
  end
  local n = rcall("HINCRBY", hash, name, "1")
  counts[#counts + 1], counts[#counts + 2], counts[#counts + 3], counts[#counts + 4] = hash, name, n, 0
  return n
end

-- n: the claims this call made (a single claim counted its own at once).
local function flush(n)
  for _, ck in ipairs(touched) do
    rcall("ZREMRANGEBYRANK", ready_key(P, ck), "0", int((at[ck] - 1) / 2 - 1))  -- the boards taken
    local front = nil
    for j = 1, #fronts, 2 do
      if fronts[j] == ck then front = fronts[j + 1] end
    end
    if front then
      rcall("ZADD", K.ready_fronts, front, ck)
    else
      rcall("ZREM", K.ready_fronts, ck)
    end
  end
  if #ran > 0 then rcall("ZADD", K.running, unpack(ran)) end
  if #busy > 0 then rcall("SADD", K.idx_busy, unpack(busy)) end
  if batch and n > 0 then rcall("INCRBY", K.stats_claims, int(n)) end
  for j = 1, #counts, 4 do
    if counts[j + 3] > 0 then rcall("HINCRBY", counts[j], counts[j + 1], int(counts[j + 3])) end
  end
end

-- The ready line whose front board waited longest among the lines with a usable model (rules 3, 4):
-- its chain key, board, model and provider; else nil and the refused lines. Model choice lives in
-- lib/core.lua (pick_model, shared with explain_boards). left: how many claims this call may still make.
local function choose(view, left)
  local refused, j = {}, 1
  while j <= #fronts do
    local ck = fronts[j]
    local model, provider, reason = pick_model(view, now, ck)
    if not model then
      refused[#refused + 1] = {ck, reason}
      j = j + 2
    else
      local rows = lines[ck]
      if not rows then
        rows = rcall("ZRANGE", ready_key(P, ck), "0", int(left), "WITHSCORES")
        lines[ck] = rows
      end
      local i = at[ck] or 1
      local b = rows[i]
      if b then
        return {ck = ck, board = b, next_place = rows[i + 3], model = model, provider = provider}
      end
      -- an empty line listed (doctor reports how): it leaves fronts, and is skipped (a line this call took
      -- boards from left fronts with its last board, so this is one found empty on its first read)
      rcall("ZREM", K.ready_fronts, ck)
      table.remove(fronts, j)
      table.remove(fronts, j)
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
  if batch then
    ran[#ran + 1] = deadline_s
    ran[#ran + 1] = id
  else
    rcall("ZADD", K.running, deadline_s, id)
  end
  local blocked_m = note_inflight(K, "m", model, count_up(K.inflight_model, model), true)
  local blocked_p = note_inflight(K, "p", provider, count_up(K.inflight_provider, provider), true)
  local probe = view.blocked["o:" .. provider] ~= nil
  rcall("HSET", tk, "status", "in_progress", "run_id", run_id, "model", model, "provider", provider,
        "claimed_at", now_s, "lease_deadline", deadline_s, "backoff_until", "0", "updated_at", now_s,
        "probe", probe and "1" or "0", "night_run", ARGV[5] == "1" and "1" or "0")
  rcall("SET", lease_key(P, id), run_id, "PX", lease_s)
  -- the board leaves its line (the board behind it is the line's front now) and runs `id`
  local went_busy = board_claimed(P, b, id, now, run_id .. "|" .. model .. "|" .. provider) == "busy"
  if batch then
    at[best.ck] = (at[best.ck] or 1) + 2
    move_front(best.ck, best.next_place)
    if went_busy then busy[#busy + 1] = b end
  else
    rcall("INCR", K.stats_claims)
    rcall("ZREM", ready_key(P, best.ck), b)
    if best.next_place then
      rcall("ZADD", K.ready_fronts, best.next_place, best.ck)
    else
      rcall("ZREM", K.ready_fronts, best.ck)
    end
    if went_busy then rcall("SADD", K.idx_busy, b) end
  end
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
local out, view = {0, 0}, nil
local function stop(refused)
  flush(out[2])
  if out[2] == 0 then return refuse(refused) end
  local skips = refuse(refused)
  for j = 2, #skips do out[#out + 1] = skips[j] end
  return out
end
for i = 0, extra do
  if running >= cap then
    local capped = {}
    for j = 1, #fronts, 2 do capped[#capped + 1] = {fronts[j], "global_cap"} end
    return stop(capped)
  end
  view = view or model_view(K, K.conf)
  local best, refused = choose(view, extra - i + 1)
  if not best then return stop(refused) end
  if take(best, i == 0 and ARGV[3] or ARGV[7 + i], out, view) then view = nil end
  out[2] = out[2] + 1
  running = running + 1
end
flush(out[2])
return out
