--[[
  load_config: replace the effective config, atomically, and bump its version (claims
  computed from an older version answer 7 and are retried). Refused when the new config
  drops a chain or model that unfinished tasks (up_next, in_progress) still use. The model
  blocks are rebuilt from the new caps (a cap may now be reached, or no longer), and cfg_claim (what a
  claim reads of the config, one document) from the new hashes.

  KEYS[1]  config              STRING the effective config as JSON
  KEYS[2]  cfg_settings        HASH
  KEYS[3]  cfg_model_cap       HASH
  KEYS[4]  cfg_provider_cap    HASH
  KEYS[5]  cfg_model_provider  HASH
  KEYS[6]  cfg_chains          HASH
  KEYS[7]  refs                HASH chain key -> unfinished tasks
  KEYS[8]  events              STREAM
  KEYS[9]  inflight_model      HASH
  KEYS[10] inflight_provider   HASH
  KEYS[11] blocked             HASH
  KEYS[12] cfg_claim           STRING what a claim reads of the cfg:* hashes, JSON (lib/core.lua claim_config)
  Built from ARGV[9]: cooldown:<model>

  ARGV[1] now (ms)  ARGV[2] config JSON  ARGV[3] settings JSON {name: integer}
  ARGV[4] model caps JSON  ARGV[5] provider caps JSON  ARGV[6] models JSON {model: provider}
  ARGV[7] chains JSON {chain: [models]}  ARGV[8] only if none is loaded yet (1/0): with one loaded, only
  cfg_claim is written, when it is missing (a namespace from before it)  ARGV[9] prefix

  Returns {0, version} | {0, version} unchanged when ARGV[8] = 1 and a config exists
          | {9, detail} a chain or model in use would disappear
]]
local rcall = redis.call
--- @include "core"

local K = {cfg_settings = KEYS[2], cfg_model_cap = KEYS[3], cfg_provider_cap = KEYS[4],
           cfg_model_provider = KEYS[5], cfg_chains = KEYS[6], inflight_model = KEYS[9],
           inflight_provider = KEYS[10], blocked = KEYS[11], cfg_claim = KEYS[12]}
local function write_claim_config()
  local c = claim_config(K)
  if c then rcall("SET", K.cfg_claim, cjson.encode(c)) end
end
if ARGV[8] == "1" and rcall("EXISTS", KEYS[1]) == 1 then
  if rcall("EXISTS", K.cfg_claim) == 0 then write_claim_config() end
  return {0, tonumber(rcall("HGET", KEYS[2], "version"))}
end
local models = cjson.decode(ARGV[6])
local chains = cjson.decode(ARGV[7])
local refs = rcall("HGETALL", KEYS[7])
for i = 1, #refs, 2 do
  local ck, n = refs[i], tonumber(refs[i + 1])
  local kind, name = string.sub(ck, 1, 1), string.sub(ck, 3)
  if n > 0 and ((kind == "c" and not chains[name]) or (kind == "m" and not models[name])) then
    local what = kind == "c" and "chain" or "model"
    return {9, what .. " '" .. name .. "' is still used by " .. n .. " unfinished task(s)"}
  end
end

local function replace(key, map, encode)
  rcall("DEL", key)
  for k, v in pairs(map) do rcall("HSET", key, k, encode(v)) end
end
local version = (tonumber(rcall("HGET", KEYS[2], "version")) or 0) + 1
replace(KEYS[2], cjson.decode(ARGV[3]), int)
rcall("HSET", KEYS[2], "version", version)
replace(KEYS[3], cjson.decode(ARGV[4]), int)
replace(KEYS[4], cjson.decode(ARGV[5]), int)
replace(KEYS[5], models, tostring)
replace(KEYS[6], chains, function(v) return table.concat(v, ",") end)
replace(K.blocked, derived_blocks(K, ARGV[9], tonumber(ARGV[1])), tostring)
write_claim_config()
rcall("SET", KEYS[1], ARGV[2])
rcall("XADD", KEYS[8], "MAXLEN", "~", "10000", "*", "type", "config_loaded", "at", ARGV[1],
      "message", "version " .. version)
return {0, version}
