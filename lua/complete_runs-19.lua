--[[
  complete_runs: record the outcomes of many runs in one call, each as complete_run records one
  (lib/core.lua complete_one, in order; each outcome is fenced by its own run id). One call costs the
  script's setup (its keys, its library, the settings check) once for the batch instead of once per
  outcome, and what the outcomes write to the same keys (the leases, `running`, in_review, idx_busy, the
  inflight and refs counters) goes out once at the end: what Broker.complete_many sends.

  KEYS[1..19] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>, task:<id>:runs, task:<id>:context, task:<id>:lease, board:<b>,
  board:<b>:queue, board:<b>:done, ready:<ck>, breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)
  ARGV[3..] one group of 7 per outcome: task id, run id, follow up (1/0), next prompt, summary,
            extra outcome fields (a JSON object, "{}" when none), digest of the outcome

  Returns one reply per outcome, in order, each as complete_run's:
          {0, status, run_count, note} | {8, status, run_count} repeated outcome
          | {1, detail} no such task | {2, detail} fenced
]]
local rcall = redis.call
--- @include "core"

if (#ARGV - 2) % 7 ~= 0 then error("clawq: complete_runs takes groups of 7 arguments after the first 2") end
local K = keys_from(RUN_END_KEYS, 1)
K.batch = {}  -- what the outcomes write to the same keys goes out once (lib/core.lua later, flush_batch)
local P, now, out = ARGV[1], clock_ms(ARGV[2]), {}
for i = 3, #ARGV, 7 do
  out[#out + 1] = complete_one(K, P, now, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
                               ARGV[i + 5], ARGV[i + 6])
end
flush_batch(K)
return out
