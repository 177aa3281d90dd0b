--[[
  claim_task: claim at most one task, atomically enforcing every queue rule.

  Rules, in order:
    1. global cap: tasks in progress < ARGV[4] (the day or night cap in force);
    2. one task per board, strict head of line: only a board's lowest up_next task_id
       may run; a paused board or a head in failure backoff is not eligible;
    3. model choice: the first model of the head's chain (or its pinned model) that is
       not cooling down, is under its model cap and whose provider is under its cap;
    4. fairness: among eligible boards, the one longest in its ready line goes first.
  Cost: boards are indexed by the chain key of their head (ready:<ck>); all boards of a
  line share the same model choice, so the claim inspects the front board of each line
  only -- O(C log N) for C chain keys in use (bounded by the config), never a board scan.

  KEYS[1]  cfg_settings        HASH   version, lease_ms, ...
  KEYS[2]  cfg_chains          HASH   chain -> "m1,m2,m3"
  KEYS[3]  cfg_model_cap       HASH   model -> cap
  KEYS[4]  cfg_provider_cap    HASH   provider -> cap
  KEYS[5]  cfg_model_provider  HASH   model -> provider
  KEYS[6]  inflight_model      HASH   model -> runs in progress
  KEYS[7]  inflight_provider   HASH   provider -> runs in progress
  KEYS[8]  running             ZSET   task id -> lease deadline
  KEYS[9]  ready_chains        SET    chain keys with ready boards
  KEYS[10] ready_seq           STRING round-robin counter
  KEYS[11] idx_busy            SET
  KEYS[12] idx_paused          SET
  KEYS[13] idx_backoff         ZSET   board -> backoff end
  KEYS[14] events              STREAM
  KEYS[15] stats_skips         HASH   reason -> total
  KEYS[16] stats_claims        STRING
  Built from ARGV[1]: ready:<ck>, board:<b>, board:<b>:queue, task:<id>, task:<id>:runs,
  task:<id>:lease, cooldown:<model>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] run id (new UUID)  ARGV[4] global cap
  ARGV[5] night (1/0)  ARGV[6] config version the caller computed ARGV[4] from

  Returns
    {0, task_id, board, model, provider, run_id, run_count, attempt, lease_deadline_ms}
    {6, reason, count, reason, count, ...}   nothing claimable (skip reasons by board)
    {7}                                      config changed since the caller read it
]]
local rcall = redis.call
--- @include "core"

local K = {cfg_settings = KEYS[1], cfg_chains = KEYS[2], cfg_model_cap = KEYS[3],
           cfg_provider_cap = KEYS[4], cfg_model_provider = KEYS[5], inflight_model = KEYS[6],
           inflight_provider = KEYS[7], running = KEYS[8], ready_chains = KEYS[9],
           ready_seq = KEYS[10], idx_busy = KEYS[11], idx_paused = KEYS[12],
           idx_backoff = KEYS[13], events = KEYS[14], stats_skips = KEYS[15], stats_claims = KEYS[16]}
local P = ARGV[1]
local now = clock_ms(ARGV[2])
local run_id = ARGV[3]
local global_cap = tonumber(ARGV[4])

if rcall("HGET", K.cfg_settings, "version") ~= ARGV[6] then return {7} end

-- Boards whose backoff ended join their ready line (the broker's delayed work, atomic with claims).
local due = rcall("ZRANGEBYSCORE", K.idx_backoff, "-inf", now, "LIMIT", 0, 100)
for _, b in ipairs(due) do reindex_board(K, P, b, now) end

-- Model choice (rule 3) lives in lib/core.lua: pick_model, shared with explain_boards.
local checked = {}
local function pick(ck) return pick_model(K, P, now, ck, checked) end

local reasons = {}
local function count(reason, n)
  if n > 0 then reasons[reason] = (reasons[reason] or 0) + n end
end

local function refuse()
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

local chains = rcall("SMEMBERS", K.ready_chains)
if rcall("ZCARD", K.running) >= global_cap then
  for _, ck in ipairs(chains) do count("global_cap", rcall("ZCARD", ready_key(P, ck))) end
  return refuse()
end

local best = nil
for _, ck in ipairs(chains) do
  local front = rcall("ZRANGE", ready_key(P, ck), 0, 0, "WITHSCORES")
  if front[1] then
    local model, provider, reason = pick(ck)
    if not model then
      count(reason, rcall("ZCARD", ready_key(P, ck)))
    elseif not best or tonumber(front[2]) < best.score then
      best = {score = tonumber(front[2]), board = front[1], model = model, provider = provider}
    end
  else
    rcall("SREM", K.ready_chains, ck)
  end
end
if not best then return refuse() end

-- Claim the head of the chosen board.
local b = best.board
local id = rcall("ZRANGE", queue_key(P, b), 0, 0)[1]
local tk = task_key(P, id)
local t = rcall("HMGET", tk, "run_count", "attempts")
local run_count = num(t[1], 0) + 1
local attempt = num(t[2], 0) + 1
local lease_ms = num(rcall("HGET", K.cfg_settings, "lease_ms"), 1380000)
local deadline = now + lease_ms

rcall("ZREM", queue_key(P, b), id)
rcall("ZADD", K.running, deadline, id)
rcall("HSET", board_key(P, b), "running", id, "served_at", int(now))
rcall("HINCRBY", K.inflight_model, best.model, 1)
rcall("HINCRBY", K.inflight_provider, best.provider, 1)
rcall("HSET", tk, "status", "in_progress", "run_id", run_id, "model", best.model,
      "provider", best.provider, "claimed_at", int(now), "lease_deadline", int(deadline),
      "backoff_until", "0", "updated_at", int(now))
rcall("RPUSH", runs_key(P, id), cjson.encode({run_id = run_id, board = b, model = best.model,
      provider = best.provider, run_count = run_count, attempt = attempt,
      claimed_at = now / 1000, night = ARGV[5] == "1"}))
rcall("SET", lease_key(P, id), run_id, "PX", lease_ms)
rcall("INCR", K.stats_claims)
reindex_board(K, P, b, now)
emit(K, now, "claimed", {"task_id", id, "board", b, "model", best.model, "provider", best.provider,
                         "run_id", run_id, "run_count", run_count, "attempt", attempt})
return {0, tonumber(id), b, best.model, best.provider, run_id, run_count, attempt, deadline}
