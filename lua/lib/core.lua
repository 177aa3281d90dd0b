--[[
  core: the rules every operation shares, included by the scripts that need them
  (`--- @include "core"`; the loader inlines this file once, at import).

  Key builders mirror broker/keys.py (tests/test_keys.py checks they agree). They build
  the keys a script only knows once it has decided -- a board's queue, a task's hash --
  from the namespace prefix ARGV[1], `clawq:{<ns>}:`, so every key keeps the hash tag:
    board:<b>  board:<b>:queue  board:<b>:done  task:<id>  task:<id>:runs
    task:<id>:context  task:<id>:lease  ready:<ck>  cooldown:<model>  schedule:<id>
    breaker:<provider>  breaker:<provider>:failures

  Functions take K, a table of the namespace keys the calling script got in KEYS,
  by their broker/keys.py names (K.running, K.ready_fronts, ...).
  The including script defines `rcall` (its body starts `local rcall = redis.call`).
]]

local function board_key(P, b) return P .. "board:" .. b end
local function queue_key(P, b) return P .. "board:" .. b .. ":queue" end
local function done_key(P, b) return P .. "board:" .. b .. ":done" end
local function task_key(P, id) return P .. "task:" .. id end
local function runs_key(P, id) return P .. "task:" .. id .. ":runs" end
local function context_key(P, id) return P .. "task:" .. id .. ":context" end
local function lease_key(P, id) return P .. "task:" .. id .. ":lease" end
local function ready_key(P, ck) return P .. "ready:" .. ck end
local function cooldown_key(P, m) return P .. "cooldown:" .. m end
local function schedule_key(P, id) return P .. "schedule:" .. id end
local function breaker_key(P, p) return P .. "breaker:" .. p end
local function breaker_failures_key(P, p) return P .. "breaker:" .. p .. ":failures" end

local function num(v, default)
  return tonumber(v) or default
end

-- A config setting read from cfg_settings or cfg:claim (load_config writes every one): a missing one is
-- an error, never a default of the script's own, so the config stays the one statement of each setting.
local function setting(v, name)
  local n = tonumber(v)
  if n == nil then error("clawq: config setting " .. name .. " is missing: load a config (clawq config load)") end
  return n
end

-- What a claim reads of the config, in one read: cfg:claim (STRING), a JSON document that load_config and
-- doctor --repair derive from the cfg:* hashes (claim_config):
--   {version = n, lease_ms = n, provider = {model = provider}, chains = {chain = "m1,m2"},
--    model_cap = {model = n}, provider_cap = {provider = n}}
-- One GET and a decode instead of an HMGET of the settings, two HGETALLs and a cap HGET per counter the
-- claim moves. It holds no other setting: decoding one costs every claim, and no claim reads one (the
-- scripts that end a run read cfg_settings and the caps with an HMGET and two HGETs, cheaper than a decode).
-- Missing or unreadable, the call fails before it writes anything, as a missing setting does.
local CLAIM_CONFIG_MAPS = {"provider", "chains", "model_cap", "provider_cap"}
local function read_claim_config(key)
  local raw = rcall("GET", key)
  local ok, c = false, nil
  if raw then ok, c = pcall(cjson.decode, raw) end
  if ok and type(c) == "table" and tonumber(c.version) then
    for _, part in ipairs(CLAIM_CONFIG_MAPS) do
      if type(c[part]) ~= "table" then ok = false end
    end
    if ok then return c end
  end
  error("clawq: config document cfg:claim is " .. (raw and "unreadable" or "missing") ..
        ": load a config (clawq config load), or run clawq doctor --repair")
end

-- The script's clock in ms: ARGV's value when the caller gives one (tests drive a fake clock), else
-- the server's TIME, read once per call, so every client's events are stamped in the order Redis ran
-- them, whatever the clients' clock skew.
local function clock_ms(arg)
  if arg ~= "" then return tonumber(arg) end
  local t = rcall("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integer text for ids and millisecond times (tostring would use exponent notation past 1e14). Redis turns a
-- number argument of redis.call into text with printf("%.17g"), which costs more than a call's own work: a
-- script passes times and counters as int() text, and literals as strings ("0", "1"). The last answer is
-- kept: a script formats its `now` many times.
local int_v, int_s
local function int(v)
  if v ~= int_v then int_v, int_s = v, string.format("%d", v) end
  return int_s
end

-- Milliseconds as JSON seconds with 3 decimals ("1733370000.120"): what cjson.encode(ms / 1000) means, without
-- its printf("%.14g"). Readers take JSON numbers, so the trailing zero changes nothing.
local function secs_json(ms)
  local s = math.floor(ms / 1000)
  return string.format("%d.%03d", s, ms - s * 1000)
end

-- Events: a capped stream of typed events. fields is a flat list of name, value pairs.
local function emit(K, now, etype, fields)
  local args = {"XADD", K.events, "MAXLEN", "~", "10000", "*", "type", etype, "at", int(now)}
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if v ~= nil and v ~= false and v ~= "" then
      args[#args + 1] = fields[i]
      args[#args + 1] = (type(v) == "number" and v % 1 == 0) and int(v) or tostring(v)
    end
  end
  rcall(unpack(args))
end

-- Actionable errors, newest first, for `clawq health` (root cause in `reason`).
local function record_error(K, now, reason, id, t, message)
  local doc = cjson.encode({reason = reason, task_id = tonumber(id), board = t.board,
                            model = t.model or "", message = message or "", at = now / 1000})
  rcall("LPUSH", K.errors, doc)
  rcall("LTRIM", K.errors, "0", "99")
  if t.model and t.model ~= "" then
    rcall("HINCRBY", K.stats_failures, t.model .. "|" .. reason, "1")
  end
end

-- A batch script (complete_runs) ends many runs in one call. It sets K.batch = {}; then what its runs write
-- to the same keys goes out once, by flush_batch(K) before it replies: the members later() gathers per
-- command and key (the runs' leases, `running`, the final place's ZSET, idx_busy), and the moves of the
-- counters counter_down() moves (inflight, refs). A counter's first move in the call is written at once (its
-- reply is the base), later moves are summed and written once. Only what nothing in the call reads back is
-- gathered. Without K.batch every write goes out at once.
local function later(K, cmd, key, ...)
  local B = K.batch
  if not B then return rcall(cmd, key, ...) end
  local id = cmd == "DEL" and cmd or cmd .. " " .. key  -- DEL takes many keys
  local w = B[id]
  if not w then
    w = {cmd, key}
    B[id] = w
    B[#B + 1] = w
  elseif cmd == "DEL" then
    w[#w + 1] = key
  end
  for _, v in ipairs({...}) do w[#w + 1] = v end
end

-- Rule 3, model choice, reads one small index instead of every counter: `blocked` (HASH) holds
--   m:<model>     model_quota_reached     while inflight:model[model] >= its model cap
--   p:<provider>  provider_quota_reached  while inflight:provider[provider] >= its provider cap
--   c:<model>     <until_ms>|<reason>     the model's cooldown; it blocks while until_ms > now
--   o:<provider>  <until_ms>|<probe>      the provider's breaker is not closed (see breaker_gate)
-- (cooldown:<model> keeps the same value with a TTL, for redis-cli and the health view). It is kept
-- where its inputs change: a counter crossing its cap (note_inflight), a cooldown (cool_model), a
-- config load and doctor --repair (derived_blocks). Each rule has its reason here, nowhere else.
-- o:<provider> mirrors breaker:<provider> (open_breaker, close_breaker, breaker_probe, breaker_after).
local BLOCK_REASON = {m = "model_quota_reached", p = "provider_quota_reached"}

-- inflight:<kind>[name] just moved by one to n (kind m = model, p = provider; up = it grew):
-- block it when it reached its cap, unblock it when it fell below (then returns true).
-- K needs blocked, and the caps: K.conf (a claim's read_claim_config) or cfg_model_cap and cfg_provider_cap.
local function note_inflight(K, kind, name, n, up)
  local cap
  if K.conf then
    cap = tonumber((kind == "m" and K.conf.model_cap or K.conf.provider_cap)[name])
  elseif K.batch then
    -- read once per call: a batch (complete_runs) moves the same few counters many times
    local caps, id = K.caps or {}, kind .. ":" .. name
    K.caps = caps
    cap = caps[id]
    if cap == nil then
      cap = tonumber(rcall("HGET", kind == "m" and K.cfg_model_cap or K.cfg_provider_cap, name)) or false
      caps[id] = cap
    end
  else
    cap = tonumber(rcall("HGET", kind == "m" and K.cfg_model_cap or K.cfg_provider_cap, name))
  end
  if not cap then return false end
  if up and n >= cap then
    rcall("HSET", K.blocked, kind .. ":" .. name, BLOCK_REASON[kind])
    return true
  elseif not up and n == cap - 1 then
    rcall("HDEL", K.blocked, kind .. ":" .. name)
    return true
  end
  return false
end

-- The end time of a cooldown value `<until_ms>|<reason>` (0 when malformed).
local function cooldown_end(v)
  local sep = string.find(v, "|", 1, true)
  if not sep then return 0 end
  return num(string.sub(v, 1, sep - 1), 0)
end

-- Cool `model` until `until_ms`. grow_only: a cooldown never shrinks (max-merge).
-- Returns the cooldown end in force afterwards. K needs blocked.
local function cool_model(K, P, model, now, until_ms, reason, grow_only)
  local key = cooldown_key(P, model)
  if grow_only then
    local v = rcall("GET", key)
    if v then
      local old = cooldown_end(v)
      if old >= until_ms then return old end
    end
  end
  if until_ms <= now then
    rcall("DEL", key)
    rcall("HDEL", K.blocked, "c:" .. model)
    return now
  end
  local v = int(until_ms) .. "|" .. reason
  rcall("SET", key, v, "PX", int(until_ms - now))
  rcall("HSET", K.blocked, "c:" .. model, v)
  return until_ms
end

-- The provider breaker. breaker:<p> (HASH) exists while the breaker is not closed:
--   until        end of the opening (ms): open before it, half-open after it
--   cooldown_ms  the length of that opening (a probe that fails doubles it, up to the max)
--   cause        what opened it (overloaded, timeout, unreachable, rate_limit, operator)
--   opened_at    when (ms)
--   probe        the half-open probe's run id while it runs; probe_task its task id
-- breaker:<p>:failures (ZSET) run id -> time of each qualifying failure within the window, while closed.
-- blocked o:<p> = "<until_ms>|<probe run id or empty>" mirrors it, so a claim reads it with the other blocks.
local function breaker_block(until_ms, probe)
  return int(until_ms) .. "|" .. (probe or "")
end

-- Whether breaker block value `v` refuses a claim at `now`: open until its end; half-open after it, where
-- exactly one run (the probe) may be claimed, so it refuses again while a probe runs.
local function breaker_refuses(v, now)
  local sep = string.find(v, "|", 1, true)
  if not sep then return true end
  return num(string.sub(v, 1, sep - 1), 0) > now or sep < #v
end

-- Open provider `p`'s breaker for `cooldown_ms` (an opening: event provider_open, one alert).
-- K needs blocked, events.
local function open_breaker(K, P, p, now, cause, cooldown_ms)
  local bk, until_ms = breaker_key(P, p), now + cooldown_ms
  rcall("DEL", bk, breaker_failures_key(P, p))
  rcall("HSET", bk, "until", int(until_ms), "cooldown_ms", int(cooldown_ms), "cause", cause, "opened_at", int(now))
  rcall("HSET", K.blocked, "o:" .. p, breaker_block(until_ms, ""))
  emit(K, now, "provider_open", {"provider", p, "cause", cause, "until", int(until_ms),
                                 "cooldown_ms", int(cooldown_ms)})
  return until_ms
end

-- Close provider `p`'s breaker fully: its back-off and failure window reset. K needs blocked, events.
local function close_breaker(K, P, p, now, why)
  rcall("DEL", breaker_key(P, p), breaker_failures_key(P, p))
  rcall("HDEL", K.blocked, "o:" .. p)
  emit(K, now, "provider_closed", {"provider", p, "message", why})
end

-- A claim took half-open provider `p` for run `run_id` of task `id`: that run is the probe.
local function breaker_probe(K, P, p, now, run_id, id)
  local bk = breaker_key(P, p)
  rcall("HSET", bk, "probe", run_id, "probe_task", id)
  rcall("HSET", K.blocked, "o:" .. p, breaker_block(num(rcall("HGET", bk, "until"), now), run_id))
  emit(K, now, "provider_probe", {"provider", p, "task_id", id, "run_id", run_id})
end

-- A run of `t.provider` ended. verdict: "fault" (a qualifying failure: the provider failed), "ok" (the
-- provider answered, whatever the task's fate) or "void" (the run tells nothing: released, reaped,
-- cancelled). The probe's verdict closes (ok), re-opens with the doubled cooldown (fault) or frees the
-- probe slot (void). While closed, `breaker_failures` faults within the window open it; a fault of a run
-- claimed before an opening counts nothing. O(1). K needs cfg_settings, blocked, events.
local function breaker_after(K, P, t, now, verdict, cause)
  local p = t.provider
  if not p or p == "" then return end
  -- The claim wrote t.probe ("1" / "0"): a run that was no probe and did not fail tells the breaker
  -- nothing, known without reading it (a run claimed before the field existed reads it).
  if verdict ~= "fault" and t.probe == "0" then return end
  local bk = breaker_key(P, p)
  local b = rcall("HMGET", bk, "until", "probe", "cooldown_ms")
  if b[2] and b[2] == t.run_id then
    if verdict == "ok" then
      close_breaker(K, P, p, now, "the probe succeeded")
    elseif verdict == "fault" then
      local max_ms = setting(rcall("HGET", K.cfg_settings, "breaker_max_cooldown_ms"),
                             "breaker_max_cooldown_ms")
      open_breaker(K, P, p, now, cause, math.max(1, math.min(num(b[3], 0) * 2, max_ms)))
    else
      rcall("HDEL", bk, "probe", "probe_task")
      rcall("HSET", K.blocked, "o:" .. p, breaker_block(num(b[1], now), ""))
    end
    return
  end
  if verdict ~= "fault" or b[1] then return end
  local cfg = rcall("HMGET", K.cfg_settings, "breaker_failures", "breaker_window_ms", "breaker_cooldown_ms")
  local failures = setting(cfg[1], "breaker_failures")
  if failures < 1 then return end
  local fk, window = breaker_failures_key(P, p), setting(cfg[2], "breaker_window_ms")
  rcall("ZADD", fk, int(now), t.run_id)
  rcall("ZREMRANGEBYSCORE", fk, "-inf", int(now - window))
  if rcall("ZCARD", fk) >= failures then
    open_breaker(K, P, p, now, cause, setting(cfg[3], "breaker_cooldown_ms"))
  else
    rcall("PEXPIRE", fk, window)
  end
end

-- What `blocked` must hold at `now`, derived from the caps, counters, cooldown keys and breakers of the
-- configured models (a config load writes it; doctor compares and repairs with it).
local function derived_blocks(K, P, now)
  local want = {}
  for kind, keys in pairs({m = {K.cfg_model_cap, K.inflight_model}, p = {K.cfg_provider_cap, K.inflight_provider}}) do
    local caps = rcall("HGETALL", keys[1])
    for i = 1, #caps, 2 do
      if num(rcall("HGET", keys[2], caps[i]), 0) >= tonumber(caps[i + 1]) then
        want[kind .. ":" .. caps[i]] = BLOCK_REASON[kind]
      end
    end
  end
  for _, model in ipairs(rcall("HKEYS", K.cfg_model_provider)) do
    local v = rcall("GET", cooldown_key(P, model))
    if v and cooldown_end(v) > now then want["c:" .. model] = v end
  end
  for _, p in ipairs(rcall("HVALS", K.cfg_model_provider)) do
    if not want["o:" .. p] then
      local b = rcall("HMGET", breaker_key(P, p), "until", "probe")
      if b[1] then want["o:" .. p] = breaker_block(tonumber(b[1]), b[2]) end
    end
  end
  return want
end

-- A HASH as a Lua table.
local function hash_table(key)
  local flat, t = rcall("HGETALL", key), {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- The document cfg:claim must hold (read_claim_config), from the cfg:* hashes it is derived from (nil when
-- no config is loaded). load_config writes it with the hashes; doctor compares it and repairs with it.
-- K needs cfg_settings, cfg_model_provider, cfg_chains, cfg_model_cap, cfg_provider_cap.
local function claim_config(K)
  local s = rcall("HMGET", K.cfg_settings, "version", "lease_ms")
  if not s[1] then return nil end
  local c = {version = tonumber(s[1]), lease_ms = tonumber(s[2]), provider = hash_table(K.cfg_model_provider),
             chains = hash_table(K.cfg_chains), model_cap = {}, provider_cap = {}}
  for model, v in pairs(hash_table(K.cfg_model_cap)) do c.model_cap[model] = tonumber(v) end
  for p, v in pairs(hash_table(K.cfg_provider_cap)) do c.provider_cap[p] = tonumber(v) end
  return c
end

-- What model choice reads, once per call: the blocks (K.blocked), each model's provider and the chains
-- (from `conf`: read_claim_config's document, or a table of the two hashes for a reader of the hashes).
local function model_view(K, conf)
  return {blocked = hash_table(K.blocked), provider = conf.provider, chains = conf.chains, models = {}}
end

-- Why `model` cannot take a task at `now`, or nil and its provider. An unknown model (dropped
-- from the config) counts as quota reached.
local function check_model(V, now, model)
  local provider = V.provider[model]
  if not provider then return "model_quota_reached", nil end
  local c = V.blocked["c:" .. model]
  if c and cooldown_end(c) > now then return "model_rate_limited", nil end
  local o = V.blocked["o:" .. provider]
  if o and breaker_refuses(o, now) then return "provider_open", nil end
  local reason = V.blocked["m:" .. model] or V.blocked["p:" .. provider]
  if reason then return reason, nil end
  return nil, provider
end

-- The models of a chain key, in fallback order: `c:<chain>` from the config, `m:<model>` pinned.
local function chain_models(V, ck)
  if string.sub(ck, 1, 2) == "m:" then return {string.sub(ck, 3)} end
  local models = {}
  for m in string.gmatch(V.chains[string.sub(ck, 3)] or "", "[^,]+") do models[#models + 1] = m end
  return models
end

-- The first usable model of chain key `ck` and its provider; else nil, nil and the reason of
-- the chain's first model. V (a model_view) remembers each model's answer within one call.
local function pick_model(V, now, ck)
  local first_reason = "model_quota_reached"
  for i, model in ipairs(chain_models(V, ck)) do
    local c = V.models[model]
    if not c then
      local reason, provider = check_model(V, now, model)
      c = {reason, provider}
      V.models[model] = c
    end
    if not c[1] then return model, c[2], nil end
    if i == 1 then first_reason = c[1] end
  end
  return nil, nil, first_reason
end

-- Ready lines: ready:<ck> (board -> place in line) and ready:fronts (ck -> the place of its line's
-- front board, for the lines that are not empty), so a claim reads the fronts of every line at once.
-- Board `b` leaves line `ck`: the line's front, if it was `b`, is the next board or none.
local function leave_line(K, P, b, ck)
  local rk = ready_key(P, ck)
  rcall("ZREM", rk, b)
  local front = rcall("ZRANGE", rk, "0", "0", "WITHSCORES")
  if front[1] then
    rcall("ZADD", K.ready_fronts, front[2], ck)
  else
    rcall("ZREM", K.ready_fronts, ck)
  end
end

-- Put board `b` in exactly one index, by its state:
--   idle     no queued task                       (no index)
--   paused   paused, with queued work             K.idx_paused
--   busy     a task in progress, more queued      K.idx_busy
--   backoff  head in failure backoff              K.idx_backoff (score = backoff end)
--   ready    head may run                         ready:<ck of head> (score = place in line)
-- A ready board that stays ready on the same line keeps its place; a board that
-- becomes ready joins the back of the line (round-robin across boards).
-- known (optional): {task id, ck, backoff_until} of a task the caller just wrote, not read back if it is the head.
local function state_of(P, b, now, st, known)
  st = st or rcall("HMGET", board_key(P, b), "running", "paused")
  local head = rcall("ZRANGE", queue_key(P, b), "0", "0")[1]
  if not head then return "idle", nil, nil end
  if st[2] == "1" then return "paused", nil, nil end
  if st[1] and st[1] ~= "" then return "busy", nil, nil end
  local t
  if known and known[1] == head then
    t = {known[2], known[3]}
  else
    t = rcall("HMGET", task_key(P, head), "ck", "backoff_until")
  end
  -- a head whose hash is gone (evicted, deleted by hand) can never run: the board waits as if idle, and
  -- doctor reports the queue entry (and --repair drops it), instead of every script failing on it
  if not t[1] then return "idle", nil, nil end
  local until_ms = num(t[2], 0)
  if until_ms > now then return "backoff", nil, until_ms end
  return "ready", t[1], nil
end

local function leave_index(K, P, b, state, ck)
  if state == "ready" then
    leave_line(K, P, b, ck)
  elseif state == "busy" then
    later(K, "SREM", K.idx_busy, b)
  elseif state == "paused" then
    rcall("SREM", K.idx_paused, b)
  elseif state == "backoff" then
    rcall("ZREM", K.idx_backoff, b)
  end
end

local function join_index(K, P, b, state, ck, until_ms)
  if state == "ready" then
    local place = int(rcall("INCR", K.ready_seq))
    rcall("ZADD", ready_key(P, ck), place, b)
    rcall("ZADD", K.ready_fronts, "NX", place, ck)  -- at the back: the front moves only if the line was empty
  elseif state == "busy" then
    rcall("SADD", K.idx_busy, b)
  elseif state == "paused" then
    rcall("SADD", K.idx_paused, b)
  elseif state == "backoff" then
    rcall("ZADD", K.idx_backoff, int(until_ms), b)
  end
end

-- freed (optional): the task fields (task_fields) of the board's run that just ended (end_run): its running
-- slot is emptied in the same write as its state, so a run's end reads the board hash once and writes it once.
-- `running` and `run` are left "" (none), not deleted: an HDEL would be a second write. ck is left stale when
-- the board is not ready. When the run recorded an outcome (freed.outcome, complete_one), the board's
-- `completed` count goes up in the same read and write, and freed.completed is the new count.
local function reindex_board(K, P, b, now, freed, known)
  local bk = board_key(P, b)
  local old = rcall("HMGET", bk, "running", "paused", "state", "ck", "completed")
  if freed then old[1] = nil end
  local state, ck, until_ms = state_of(P, b, now, old, known)
  local completed = old[5]
  old = {old[3], old[4]}
  local same = old[1] == state and (state ~= "ready" or old[2] == ck) and state ~= "backoff"
  if same and not freed then return state end
  if not same then
    leave_index(K, P, b, old[1], old[2])
    join_index(K, P, b, state, ck, until_ms)
  end
  local args = {"HSET", bk, "state", state}
  if ck then
    args[#args + 1] = "ck"
    args[#args + 1] = ck
  end
  if freed then
    args[#args + 1] = "running"
    args[#args + 1] = ""
    args[#args + 1] = "run"
    args[#args + 1] = ""
    if freed.outcome then
      freed.completed = num(completed, 0) + 1
      args[#args + 1] = "completed"
      args[#args + 1] = int(freed.completed)
    end
  end
  rcall(unpack(args))
  return state
end

-- A claim took the head of ready board `b` (so not paused, nothing running) and gave it task `id`:
-- reindex_board's rules for the one transition whose facts the claim knows, without reading them back.
-- The board is busy while more is queued, else idle; returns which. The claim itself takes `b` out of its
-- ready line and, when busy, puts it in idx_busy (it writes those once for all its claims).
-- run: "<run id>|<model>|<provider>", the board's `run` while it runs: what the reaper releases when the
-- task hash is gone (reap_leases' lost path; the run's history entry is written only at its end).
local function board_claimed(P, b, id, now, run)
  local state = rcall("EXISTS", queue_key(P, b)) == 1 and "busy" or "idle"
  rcall("HSET", board_key(P, b), "running", id, "run", run, "served_at", int(now), "state", state)  -- ck: nothing unless ready
  return state
end

local function task_fields(P, id)
  local v = rcall("HMGET", task_key(P, id), "board", "status", "run_id", "model", "provider",
                  "run_count", "attempts", "ck", "last_run_id", "last_digest", "probe", "last_end",
                  "claimed_at", "night_run")
  if not v[1] then return nil end
  return {board = v[1], status = v[2], run_id = v[3], model = v[4], provider = v[5],
          run_count = num(v[6], 0), attempts = num(v[7], 0), ck = v[8],
          last_run_id = v[9], last_digest = v[10], probe = v[11], last_end = v[12],
          claimed_at = v[13], night_run = v[14]}
end

-- The run end last reported by fail_run, rate_limited_run or release_run, when it was one of run_id's: the
-- task keeps `last_end` = "<run id>|<what>" of it (complete_run keeps its own `last_digest`). A caller whose first try timed out although it was applied tries again,
-- finds its run ended, and is told it repeated itself (8) instead of fenced: nothing applies twice.
-- Returns the task's fields and <what>, or nil.
local function last_report(P, id, run_id)
  local cur = task_fields(P, id)
  if not cur or not cur.last_end then return nil end
  local prefix = run_id .. "|"
  if string.sub(cur.last_end, 1, #prefix) ~= prefix then return nil end
  return cur, string.sub(cur.last_end, #prefix + 1)
end

-- keep_zero: a counter at 0 stays (a reader takes 0 and absent alike), saving a call per drop to 0;
-- for counters of bounded names (the configured models and providers). K (optional): a batch's (later()).
local function counter_down(hash, field, keep_zero, K)
  if not field then return nil end
  local B = K and K.batch
  if not B then
    local n = rcall("HINCRBY", hash, field, "-1")
    if n <= 0 and not keep_zero then rcall("HDEL", hash, field) end
    return n
  end
  local id = "# " .. hash .. " " .. field
  local c = B[id]
  if not c then
    c = {hash = hash, field = field, keep_zero = keep_zero, n = rcall("HINCRBY", hash, field, "-1"), pending = 0}
    B[id] = c
    B[#B + 1] = c
  else
    c.n, c.pending = c.n - 1, c.pending - 1
  end
  return c.n
end

local function flush_batch(K)
  for _, w in ipairs(K.batch) do
    if w.hash then
      if w.pending ~= 0 then w.n = rcall("HINCRBY", w.hash, w.field, int(w.pending)) end
      if w.n <= 0 and not w.keep_zero then rcall("HDEL", w.hash, w.field) end
    else
      rcall(unpack(w))
    end
  end
  K.batch = nil  -- written: what the call writes after this goes out at once
end

-- A run of `model` on `provider` ended: both counters go down (to 0, not absent), and their blocks follow.
local function inflight_down(K, model, provider)
  if model then note_inflight(K, "m", model, counter_down(K.inflight_model, model, true, K), false) end
  if provider then note_inflight(K, "p", provider, counter_down(K.inflight_provider, provider, true, K), false) end
end

-- End the active run of in-progress task `id`: its lease and counters are released and its
-- history entry written with `outcome`. The task is left nowhere: the caller puts it in its
-- next place in the same script, with requeue or finish, which also free the board's slot. fields (optional): more task hash
-- fields, name, value, ..., written with the run's own in one HSET.
local function end_run(K, P, id, t, now, outcome, detail, fields)
  later(K, "ZREM", K.running, id)
  inflight_down(K, t.model, t.provider)
  t.freed = true  -- the board's running slot: emptied by the caller's requeue or finish (reindex_board)
  later(K, "DEL", lease_key(P, id))
  local rk = runs_key(P, id)
  if t.night_run then
    -- The run's history entry, written once: the claim kept its facts in the task hash (run_count and
    -- attempts are still the claim's, the caller writes the new ones with `fields`).
    -- Spelled out, not cjson.encode of a table: its printf of every number cost more than the RPUSH.
    local enc = cjson.encode
    local err = (detail and detail ~= "") and ',"error":' .. enc(detail) or ""
    rcall("RPUSH", rk, '{"run_id":' .. enc(t.run_id) .. ',"board":' .. enc(t.board) .. ',"model":' ..
          enc(t.model) .. ',"provider":' .. enc(t.provider) .. ',"run_count":' .. int(t.run_count + 1) ..
          ',"attempt":' .. int(t.attempts + 1) .. ',"claimed_at":' .. secs_json(num(t.claimed_at, 0)) ..
          ',"night":' .. (t.night_run == "1" and "true" or "false") .. ',"ended_at":' .. secs_json(now) ..
          ',"outcome":' .. enc(outcome) .. err .. "}")
  else
    -- A run claimed before `night_run` existed has an open entry (the claim pushed it): close it by
    -- appending members to it, rather than decoding and re-encoding it.
    local raw = rcall("LINDEX", rk, -1)
    if raw and string.find(raw, '"run_id":' .. cjson.encode(t.run_id), 1, true) then
      local tail = ',"ended_at":' .. cjson.encode(now / 1000) .. ',"outcome":' .. cjson.encode(outcome)
      if detail and detail ~= "" then tail = tail .. ',"error":' .. cjson.encode(detail) end
      rcall("LSET", rk, -1, string.sub(raw, 1, -2) .. tail .. "}")
    end
  end
  rcall("HDEL", task_key(P, id), "run_id", "lease_deadline", "probe", "night_run")
  rcall("HSET", task_key(P, id), "last_run_id", t.run_id, "updated_at", int(now), unpack(fields or {}))
end

-- Scheduled tasks: `scheduled` (ZSET id -> due ms) holds every task that waits for its not-before time
-- or for the night window, and board:<b>.scheduled counts them per board. A scheduled task is in no
-- board queue, so it is no board's head and blocks nothing. K needs scheduled.
local function schedule_task(K, P, id, board, due)
  rcall("ZADD", K.scheduled, int(due), id)
  rcall("HSET", task_key(P, id), "status", "scheduled", "due_at", int(due))
  rcall("HINCRBY", board_key(P, board), "scheduled", "1")
end

-- A new task (add_task, a schedule's firing): at the tail of its board, or in `scheduled` when it is
-- due later. spec: id ("" = the next from task_seq), board, title, prompt, chain or pinned (the other ""),
-- due (ms or ""), night ("1" or ""), not_before (ms or ""), schedule (the firing schedule's id or nil).
-- K needs task_seq, boards, cfg_chains, cfg_model_provider, refs, the board indexes, events,
-- scheduled, night_queued. Returns add_task's reply: {0, id, status} | {4, id} | {5, msg} | {3, msg}.
local function new_task(K, P, now, spec)
  local ck
  if spec.chain ~= "" then
    if rcall("HEXISTS", K.cfg_chains, spec.chain) == 0 then return {5, "unknown chain '" .. spec.chain .. "'"} end
    ck = "c:" .. spec.chain
  else
    if rcall("HEXISTS", K.cfg_model_provider, spec.pinned) == 0 then
      return {5, "unknown model '" .. spec.pinned .. "'"}
    end
    ck = "m:" .. spec.pinned
  end
  local id
  if spec.id == "" then
    id = rcall("INCR", K.task_seq)
    if id >= 100000000000000 then
      rcall("DECR", K.task_seq)  -- refused: task_seq as it was
      return {3, "task ids are exhausted (they stay below 10**14)"}
    end
  else
    id = tonumber(spec.id)
    if rcall("EXISTS", task_key(P, spec.id)) == 1 then return {4, id} end
    if id > num(rcall("GET", K.task_seq), 0) then rcall("SET", K.task_seq, int(id)) end
  end
  local sid, board = int(id), spec.board
  local fields = {"board", board, "title", spec.title, "ck", ck, "status", "up_next", "at", int(now)}
  for _, f in ipairs({{"prompt", spec.prompt}, {"night", spec.night}, {"not_before", spec.not_before},
                      {"schedule", spec.schedule}}) do
    if f[2] and f[2] ~= "" then
      fields[#fields + 1] = f[1]
      fields[#fields + 1] = f[2]
    end
  end
  rcall("HSET", task_key(P, sid), unpack(fields))
  rcall("HINCRBY", K.refs, ck, "1")
  local due, status, waits = tonumber(spec.due), "up_next", "board"
  if due and due > now then
    status, waits = "scheduled", nil
    schedule_task(K, P, sid, board, due)
    rcall("SADD", K.boards, board)
  else
    rcall("ZADD", queue_key(P, board), sid, sid)
    if spec.night == "1" then rcall("ZADD", K.night_queued, sid, sid) end
    -- Behind a lower id the board's head, so its index, is unchanged: only a new head re-indexes it.
    -- A lower id in the queue also means the board is already in `boards` (every task that reaches a
    -- queue was added here first, and `boards` only grows), so only a new head joins it.
    if rcall("ZRANK", queue_key(P, board), sid) == 0 then
      rcall("SADD", K.boards, board)
      local state = reindex_board(K, P, board, now)
      if state ~= "busy" and state ~= "paused" then waits = nil end
    end
  end
  -- waits "board": queued behind a lower id, a run in progress or a pause, so no claim is possible that
  -- was not before (a dispatcher woken by this alone makes no pass)
  emit(K, now, "added", {"task_id", sid, "board", board, "chain", spec.chain, "model", spec.pinned,
                         "status", status, "due", due and due > now and int(due) or nil, "schedule", spec.schedule,
                         "waits", waits})
  return {0, id, status}
end

-- The task hash fields of a task back in its queue (requeue writes them unless its caller did).
local function requeue_fields(now, backoff_until)
  return {"status", "up_next", "backoff_until", int(backoff_until), "queued_at", int(now)}
end

-- Back to the board's queue, scored by its id: it is the head again if nothing lower waits.
-- written: the caller already wrote requeue_fields (with end_run's, in one HSET).
local function requeue(K, P, id, t, now, backoff_until, written)
  local sid = type(id) == "number" and int(id) or id
  rcall("ZADD", queue_key(P, t.board), sid, sid)
  if not written then rcall("HSET", task_key(P, id), unpack(requeue_fields(now, backoff_until))) end
  reindex_board(K, P, t.board, now, t.freed and t, {sid, t.ck, backoff_until})
end

-- The task hash fields of a task in final place `status` (finish writes them unless its caller did).
local function finish_fields(now, status)
  return {"status", status, "finished_at", int(now)}
end

-- A final place: in_review, failed or cancelled (each a ZSET of id -> time). An unfinished
-- task (scheduled, up_next, in_progress) stops counting in refs, the uses of its chain key.
-- written: the caller already wrote finish_fields.
local function finish(K, P, id, t, now, status, place, written)
  later(K, "ZADD", place, int(now), id)
  if not written then rcall("HSET", task_key(P, id), unpack(finish_fields(now, status))) end
  if t.status == "up_next" or t.status == "in_progress" or t.status == "scheduled" then
    counter_down(K.refs, t.ck, false, K)
  end
  return reindex_board(K, P, t.board, now, t.freed and t)
end

-- End the active run (end_run) and put its task in its next place, with one HSET of the task hash: `fields`
-- (the caller's) and the place's own. status "up_next": back at its board's head, in backoff until
-- `backoff_until` (ms, 0: none); else the final place of that name (in_review, failed: K[status]), and
-- then returns the board's state after it (reindex_board's: idle, ready, paused, backoff).
local function end_run_into(K, P, id, t, now, outcome, detail, fields, status, backoff_until)
  local up = status == "up_next"
  for _, v in ipairs(up and requeue_fields(now, backoff_until) or finish_fields(now, status)) do
    fields[#fields + 1] = v
  end
  end_run(K, P, id, t, now, outcome, detail, fields)
  if up then
    requeue(K, P, id, t, now, backoff_until, true)
    return nil
  end
  return finish(K, P, id, t, now, status, K[status], true)
end

-- A run failed (cause: failed, timeout, ...). attempts + 1; below max_attempts the task
-- returns to its board head (after backoff_ms when backoff is true), else it fails for good.
-- verdict: what the failure says about the provider (breaker_after). more (optional): task hash
-- fields of the caller's, written in the run end's one HSET.
local function fail_run(K, P, id, t, now, cause, message, retry, backoff, verdict, more)
  local attempts = t.attempts + 1
  local cfg = rcall("HMGET", K.cfg_settings, "max_attempts", "backoff_ms")
  local requeued = retry and attempts < setting(cfg[1], "max_attempts")
  local until_ms = 0
  if requeued and backoff then until_ms = now + setting(cfg[2], "backoff_ms") end
  -- One HSET of the task hash: the run's end, the failure and the task's next place (and `more`).
  local fields = {"attempts", attempts, "last_error", message or "", "last_error_reason", cause}
  for _, v in ipairs(more or {}) do fields[#fields + 1] = v end
  local status = requeued and "up_next" or "failed"
  end_run_into(K, P, id, t, now, cause, message, fields, status, until_ms)
  record_error(K, now, cause, id, t, message)
  emit(K, now, cause, {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                       "run_id", t.run_id, "attempts", attempts, "status", status, "message", message})
  breaker_after(K, P, t, now, verdict, cause)  -- after the run's own event: the failure, then the opening
  return status, attempts
end

-- The namespace keys of every script that ends or changes a run, in KEYS order after the
-- task's own keys (each such script's header lists them; tests/test_scripts_meta.py checks).
local RUN_END_KEYS = {"cfg_settings", "cfg_model_cap", "cfg_provider_cap", "blocked",
                      "running", "inflight_model", "inflight_provider", "ready_fronts",
                      "ready_seq", "idx_busy", "idx_paused", "idx_backoff", "refs", "in_review", "failed",
                      "cancelled", "events", "errors", "stats_failures"}

-- The settings the end of a run may read (fail_run, complete_run, rate_limited_run, breaker_after).
local RUN_END_SETTINGS = {"max_attempts", "backoff_ms", "max_runs", "cooldown_ms", "breaker_failures",
                          "breaker_window_ms", "breaker_cooldown_ms", "breaker_max_cooldown_ms"}

-- Fail (an error naming the setting) unless every setting in `names` is in cfg_settings; called before a
-- script writes anything, so a missing setting fails the whole call with nothing changed.
local function require_settings(key, names)
  local v = rcall("HMGET", key, unpack(names))
  for i, name in ipairs(names) do setting(v[i], name) end
end

-- The keys of a run-end script by name, its settings checked first.
local function keys_from(names, first)
  local K = {}
  for i, name in ipairs(names) do K[name] = KEYS[first + i - 1] end
  if K.cfg_settings then require_settings(K.cfg_settings, RUN_END_SETTINGS) end
  return K
end

local function fence_detail(t, run_id)
  if t.last_run_id == run_id then return "the run already ended" end
  if t.status == "in_progress" then return "another run holds the lease" end
  return "the task is " .. t.status
end

-- The task's fields when run_id is its active run; else nil, a status code and a detail.
local function active_run(P, id, run_id)
  local t = task_fields(P, id)
  if not t then return nil, 1, "task not found" end
  if t.status ~= "in_progress" or t.run_id ~= run_id then return nil, 2, fence_detail(t, run_id) end
  return t
end

-- Record the mandatory outcome of run `run_id` of task `id` (complete_run, complete_runs). Follow-up `follow`
-- ("1"): the same task returns to its board (same task_id: the head again) with the next prompt and summary
-- appended to its context -- unless it already had max_runs runs, then it goes to in_review with a note. Else
-- in_review. Either way run_count + 1, attempts 0. The provider answered: a breaker's probe that completes closes
-- it (breaker_after). Repeating the outcome of the run that just completed changes nothing and answers 8 (the
-- task keeps `last_digest` = "<run id>|<digest>" of the last recorded outcome). extra: the caller's extra
-- outcome fields, a JSON object ("{}" when none). K: keys_from(RUN_END_KEYS, ...).
-- Returns {0, status, run_count, note} | {8, status, run_count} | {1, detail} no such task | {2, detail} fenced.
local function complete_one(K, P, now, id, run_id, follow, next_prompt, summary, extra, digest)
  local t, code, detail = active_run(P, id, run_id)
  if not t then
    if code == 2 then
      local cur = task_fields(P, id)
      if cur.last_digest == run_id .. "|" .. digest then
        return {8, cur.status, cur.run_count}
      end
    end
    return {code, detail}
  end

  local follow_up = follow == "1"
  local run_count = t.run_count + 1
  local note = ""
  if follow_up and run_count >= setting(rcall("HGET", K.cfg_settings, "max_runs"), "max_runs") then
    note = "follow-up limit reached (" .. run_count .. " runs): sent to in_review"
  end

  -- One HSET of the task hash: the run's end, the outcome's figures and the task's next place.
  local requeued = follow_up and note == ""
  local status = requeued and "up_next" or "in_review"
  t.outcome = true  -- the board counts it (reindex_board: t.completed)
  local board_state = end_run_into(K, P, id, t, now, follow_up and "follow_up" or "done", note,
               {"run_count", int(run_count), "attempts", "0", "last_digest", run_id .. "|" .. digest,
                "last_summary", summary}, status, 0)
  -- The context entry: the caller's extra fields (spliced in as they came, not decoded and encoded again),
  -- then the run's, which win a repeated name as a JSON reader takes the last.
  local enc = cjson.encode
  local own = '"run_id":' .. enc(run_id) .. ',"run_count":' .. int(run_count) .. ',"model":' .. enc(t.model) ..
              ',"summary":' .. enc(summary) .. ',"at":' .. secs_json(now) ..
              (follow_up and ',"next_prompt":' .. enc(next_prompt) or "") .. "}"
  rcall("RPUSH", context_key(P, id), extra == "{}" and "{" .. own or string.sub(extra, 1, -2) .. "," .. own)
  -- outcomes per board: the board's own `completed`, counted by the run end's one write of the board
  -- (reindex_board), O(1) at any number of boards (one hash of every board is a listpack, scanned on each
  -- outcome, up to 512 boards)
  local completed = t.completed
  rcall("ZADD", done_key(P, t.board), int(now), run_id)
  -- Outcomes older than 24 h leave board:<b>:done every 64th outcome of the board, not on each one: it holds
  -- the last 24 h and at most 63 older entries, and its reader counts by time (ZCOUNT of the last hour).
  if completed % 64 == 0 then rcall("ZREMRANGEBYSCORE", done_key(P, t.board), "-inf", int(now - 86400000)) end

  if requeued then
    emit(K, now, "follow_up", {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                               "run_id", run_id, "run_count", run_count, "message", summary})
  else
    -- idle "1": its board is idle or paused and no board is ready anywhere, so no claim is possible that was
    -- not before (a dispatcher woken by this alone makes no pass); read only when its board has nothing ready
    local idle = (board_state == "idle" or board_state == "paused") and rcall("ZCARD", K.ready_fronts) == 0
    emit(K, now, "completed", {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                               "run_id", run_id, "run_count", run_count, "message", note ~= "" and note or summary,
                               "idle", idle and "1" or nil})
  end
  breaker_after(K, P, t, now, "ok")
  return {0, status, run_count, note}
end
