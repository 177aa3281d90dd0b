--[[
  scan_select: the baseline of bench/scaling.py -- the selection claim_task makes, done the way a
  scan-based selector does it: walk every board and check every rule for its head, each call.

  A board may run when it has no task in progress, is not paused, has a head, and the head's backoff
  has ended; the head runs on the first model of its chain (or its pinned model) that is not cooling
  and is under its model and provider caps; among those boards the one served longest ago wins.
  Model and chain look-ups are cached per call, as claim_task does, so the per-board cost is 3 Redis
  calls (board hash, queue head, head's fields): a strong baseline. Read-only: it only selects.

  KEYS[1] boards  KEYS[2] cfg_chains  KEYS[3] cfg_model_cap  KEYS[4] cfg_provider_cap
  KEYS[5] cfg_model_provider  KEYS[6] inflight_model  KEYS[7] inflight_provider  KEYS[8] running
  ARGV[1] prefix  ARGV[2] now (ms)  ARGV[3] global cap
  Returns {0, board, model} | {6} nothing claimable
]]
local rcall = redis.call
local P, now, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if rcall("ZCARD", KEYS[8]) >= cap then return {6} end

local usable_cache, chain_cache = {}, {}

local function check(model)
  local provider = rcall("HGET", KEYS[5], model)
  if not provider then return false end
  local cool = rcall("GET", P .. "cooldown:" .. model)
  if cool and (tonumber(string.match(cool, "^(%d+)")) or 0) > now then return false end
  local mcap = tonumber(rcall("HGET", KEYS[3], model))
  if mcap and (tonumber(rcall("HGET", KEYS[6], model)) or 0) >= mcap then return false end
  local pcap = tonumber(rcall("HGET", KEYS[4], provider))
  if pcap and (tonumber(rcall("HGET", KEYS[7], provider)) or 0) >= pcap then return false end
  return true
end

local function usable(model)
  local ok = usable_cache[model]
  if ok == nil then
    ok = check(model)
    usable_cache[model] = ok
  end
  return ok
end

local function models_of(ck)
  if string.sub(ck, 1, 2) == "m:" then return {string.sub(ck, 3)} end
  local chain = string.sub(ck, 3)
  local list = chain_cache[chain]
  if not list then
    list = {}
    for m in string.gmatch(rcall("HGET", KEYS[2], chain) or "", "[^,]+") do list[#list + 1] = m end
    chain_cache[chain] = list
  end
  return list
end

local function head_model(b)
  local head = rcall("ZRANGE", P .. "board:" .. b .. ":queue", 0, 0)[1]
  if not head then return nil end
  local t = rcall("HMGET", P .. "task:" .. head, "ck", "backoff_until")
  if (tonumber(t[2]) or 0) > now then return nil end
  for _, m in ipairs(models_of(t[1])) do
    if usable(m) then return m end
  end
  return nil
end

local best, best_model, best_served
for _, b in ipairs(rcall("SMEMBERS", KEYS[1])) do
  local st = rcall("HMGET", P .. "board:" .. b, "running", "paused", "served_at")
  if (not st[1] or st[1] == "") and st[2] ~= "1" then  -- a run's end leaves running "" (none)
    local model = head_model(b)
    local served = tonumber(st[3]) or 0
    if model and (not best or served < best_served) then
      best, best_model, best_served = b, model, served
    end
  end
end
if not best then return {6} end
return {0, best, best_model}
