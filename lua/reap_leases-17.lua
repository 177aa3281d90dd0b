--[[
  reap_leases: requeue every in-progress task whose lease deadline has passed (its agent
  stopped heart-beating). Each goes back to its board head with no backoff, attempts + 1
  (failed after max_attempts); its run loses the lease, so a late report is refused.

  KEYS[1..17] the run-end keys, in the order of RUN_END_KEYS in lib/core.lua:
           cfg_settings running inflight_model inflight_provider ready_chains ready_seq
           idx_busy idx_paused idx_backoff refs in_review failed cancelled events errors
           stats_failures stats_completed
  Built from ARGV[1]: task:<id>, task:<id>:runs, task:<id>:lease, board:<b>,
  board:<b>:queue, ready:<ck>

  ARGV[1] prefix  ARGV[2] now (ms)  ARGV[3] at most this many leases per call

  Returns {0, task_id, status, task_id, status, ...}
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 1)
local P, now = ARGV[1], tonumber(ARGV[2])
local out = {0}
local expired = rcall("ZRANGEBYSCORE", K.running, "-inf", now, "LIMIT", 0, tonumber(ARGV[3]))
for _, id in ipairs(expired) do
  local t = task_fields(P, id)
  if t and t.status == "in_progress" then
    local status = fail_run(K, P, id, t, now, "timeout", "no heartbeat: lease expired", true, false)
    out[#out + 1] = tonumber(id)
    out[#out + 1] = status
  else
    rcall("ZREM", K.running, id)
  end
end
return out
