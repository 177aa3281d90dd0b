--[[
  set_cooldown: an operator sets or clears a model's cooldown (exactly: it may shrink).
  Rate-limited runs go through rate_limited_run, whose cooldowns only grow.

  KEYS[1] cooldown (cooldown:<model>)  STRING `<until_ms>|<reason>` with TTL
  KEYS[2] cfg_model_provider           HASH (the model must be known)
  KEYS[3] blocked                      HASH (c:<model> mirrors the cooldown)
  KEYS[4] events                       STREAM

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] model  ARGV[4] cooldown end (ms; <= now clears)

  Returns {0, cooldown_end_ms} | {5, detail} unknown model
]]
local rcall = redis.call
--- @include "core"

local P, now, model, until_ms = ARGV[1], clock_ms(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if rcall("HEXISTS", KEYS[2], model) == 0 then return {5, "unknown model '" .. model .. "'"} end
local K = {blocked = KEYS[3], events = KEYS[4]}
local result = cool_model(K, P, model, now, until_ms, "manual", false)
if until_ms > now then
  emit(K, now, "cooldown_set", {"model", model, "until", int(until_ms)})
else
  emit(K, now, "cooldown_cleared", {"model", model})
end
return {0, result}
