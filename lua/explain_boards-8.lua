--[[
  explain_boards: why each given board's head is not running now (read-only). Uses the
  same rules as claim_task (lib/core.lua), so `clawq health` can never disagree with a claim.

  KEYS[1]  cfg_chains          HASH
  KEYS[2]  cfg_model_provider  HASH
  KEYS[3]  blocked             HASH
  KEYS[4]  running             ZSET
  KEYS[5]  idx_busy            SET
  KEYS[6]  idx_paused          SET
  KEYS[7]  idx_backoff         ZSET
  KEYS[8]  cfg_settings        HASH   version (the caller's global cap came from that config)
  Built from ARGV[1]: board:<b>, board:<b>:queue, task:<id>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] global cap
  ARGV[4] the config version the caller computed ARGV[3] from  ARGV[5..] board names

  Returns {7} when the config changed since the caller read it, else {0, reason, reason, ...}, one per
  board, each one of:
    idle (nothing queued), running (its task runs, nothing else queued), board_busy,
    board_paused, backoff, global_cap, model_rate_limited, model_quota_reached,
    provider_quota_reached, provider_open, ready (it may run: the next claim can take it)
]]
local rcall = redis.call
--- @include "core"

local K = {cfg_chains = KEYS[1], cfg_model_provider = KEYS[2], blocked = KEYS[3]}
if (rcall("HGET", KEYS[8], "version") or "") ~= ARGV[4] then return {7} end
local P, now = ARGV[1], clock_ms(ARGV[2])
local full = rcall("ZCARD", KEYS[4]) >= tonumber(ARGV[3])
local view = model_view(K, {provider = hash_table(K.cfg_model_provider), chains = hash_table(K.cfg_chains)})

local function explain(b)
  local state, ck = state_of(P, b, now)
  if state == "idle" then
    return (rcall("HGET", board_key(P, b), "running") or "") ~= "" and "running" or "idle"
  end
  if state == "busy" then return "board_busy" end
  if state == "paused" then return "board_paused" end
  if state == "backoff" then return "backoff" end
  if full then return "global_cap" end
  local model, _, reason = pick_model(view, now, ck)
  if model then return "ready" end
  return reason
end

local out = {0}
for i = 5, #ARGV do out[#out + 1] = explain(ARGV[i]) end
return out
