--[[
  set_breaker: an operator opens a provider's breaker for an exact time, or closes it fully.
  An operator's opening is an opening like any other (event provider_open, cause operator;
  a probe that fails after it doubles its length); closing resets the back-off and the
  failure window at once (event provider_closed when it was not closed).

  KEYS[1] breaker (breaker:<provider>)            HASH until, cooldown_ms, cause, opened_at, probe, probe_task
  KEYS[2] breaker_failures (breaker:<provider>:failures)  ZSET run id -> time of a qualifying failure
  KEYS[3] cfg_model_provider                      HASH (the provider must have a model)
  KEYS[4] blocked                                 HASH (o:<provider> mirrors the breaker)
  KEYS[5] events                                  STREAM

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] provider
  ARGV[4] opening length (ms; 0 closes)

  Returns {0, "open", until_ms} | {0, "closed", 0} | {5, detail} unknown provider
]]
local rcall = redis.call
--- @include "core"

local P, now, provider, length = ARGV[1], clock_ms(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local known = false
for _, p in ipairs(rcall("HVALS", KEYS[3])) do
  if p == provider then known = true break end
end
if not known then return {5, "unknown provider '" .. provider .. "'"} end
local K = {blocked = KEYS[4], events = KEYS[5]}
if length > 0 then
  return {0, "open", open_breaker(K, P, provider, now, "operator", length)}
end
if rcall("EXISTS", KEYS[1]) == 1 then
  close_breaker(K, P, provider, now, "closed by an operator")
else
  rcall("DEL", KEYS[2])
end
return {0, "closed", 0}
