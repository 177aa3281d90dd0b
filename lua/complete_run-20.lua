--[[
  complete_run: record the mandatory outcome of a run (fenced by run id); the rules are lib/core.lua
  complete_one, shared with complete_runs (many outcomes in one call).
  Follow-up YES: the same task returns to its board (same task_id: the head again) with the
  next prompt and summary appended to its context -- unless it already had max_runs runs,
  then it goes to in_review with a note. NO: in_review. Either way run_count + 1, attempts 0.
  The provider answered: a breaker's probe that completes closes it (lib/core.lua breaker_after).
  Repeating the outcome of the run that just completed changes nothing and answers 8
  (the task keeps `last_digest` = "<run id>|<digest>" of the last recorded outcome).

  KEYS[1]  task (task:<id>)   HASH
  KEYS[2..20] the run-end keys: RUN_END_KEYS in lib/core.lua, in its order (named only there).
  Built from ARGV[1]: task:<id>:runs, task:<id>:context, task:<id>:lease, board:<b>,
  board:<b>:queue, board:<b>:done, ready:<ck>, breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] task id  ARGV[4] run id  ARGV[5] follow up (1/0)
  ARGV[6] next prompt  ARGV[7] summary  ARGV[8] extra outcome fields (a JSON object, "{}" when none)
  ARGV[9] digest of the outcome (to recognise a repeat)

  Returns {0, status, run_count, note} | {8, status, run_count} repeated outcome
          | {1, detail} no such task | {2, detail} fenced
]]
local rcall = redis.call
--- @include "core"

local K = keys_from(RUN_END_KEYS, 2)
local reply = complete_one(K, ARGV[1], clock_ms(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
return reply
