--[[
  complete_run: record the mandatory outcome of a run (fenced by run id).
  Follow-up YES: the same task returns to its board (same task_id: the head again) with the
  next prompt and summary appended to its context -- unless it already had max_runs runs,
  then it goes to in_review with a note. NO: in_review. Either way run_count + 1, attempts 0.
  The provider answered: a breaker's probe that completes closes it (lib/core.lua breaker_after).
  Repeating the outcome of the run that just completed changes nothing and answers 8
  (the task keeps `last_digest` = "<run id>|<digest>" of the last recorded outcome).

  KEYS[1]  task (task:<id>)   HASH
  KEYS[2..21] the run-end keys, in the order of RUN_END_KEYS in lib/core.lua:
           cfg_settings cfg_model_cap cfg_provider_cap blocked running inflight_model
           inflight_provider ready_fronts ready_seq idx_busy idx_paused idx_backoff refs
           in_review failed cancelled events errors stats_failures stats_completed
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
local P, now, id, run_id = ARGV[1], clock_ms(ARGV[2]), ARGV[3], ARGV[4]

local t, code, detail = active_run(P, id, run_id)
if not t then
  if code == 2 then
    local cur = task_fields(P, id)
    if cur.last_digest == run_id .. "|" .. ARGV[9] then
      return {8, cur.status, cur.run_count}
    end
  end
  return {code, detail}
end

local follow_up = ARGV[5] == "1"
local run_count = t.run_count + 1
local note = ""
if follow_up and run_count >= setting(rcall("HGET", K.cfg_settings, "max_runs"), "max_runs") then
  note = "follow-up limit reached (" .. run_count .. " runs): sent to in_review"
end

-- One HSET of the task hash: the run's end, the outcome's figures and the task's next place.
local requeued = follow_up and note == ""
local status = requeued and "up_next" or "in_review"
end_run_into(K, P, id, t, now, follow_up and "follow_up" or "done", note,
             {"run_count", int(run_count), "attempts", "0", "last_digest", run_id .. "|" .. ARGV[9],
              "last_summary", ARGV[7]}, status, 0)
-- The context entry: the caller's extra fields (a JSON object, spliced in as it came, not decoded and encoded
-- again), then the run's, which win a repeated name as a JSON reader takes the last.
local enc, extra = cjson.encode, ARGV[8]
local own = '"run_id":' .. enc(run_id) .. ',"run_count":' .. int(run_count) .. ',"model":' .. enc(t.model) ..
            ',"summary":' .. enc(ARGV[7]) .. ',"at":' .. secs_json(now) ..
            (follow_up and ',"next_prompt":' .. enc(ARGV[6]) or "") .. "}"
rcall("RPUSH", context_key(P, id), extra == "{}" and "{" .. own or string.sub(extra, 1, -2) .. "," .. own)
local completed = rcall("HINCRBY", K.stats_completed, t.board, "1")
rcall("ZADD", done_key(P, t.board), int(now), run_id)
-- Outcomes older than 24 h leave board:<b>:done every 64th outcome of the board, not on each one: it holds
-- the last 24 h and at most 63 older entries, and its reader counts by time (ZCOUNT of the last hour).
if completed % 64 == 0 then rcall("ZREMRANGEBYSCORE", done_key(P, t.board), "-inf", int(now - 86400000)) end

if requeued then
  emit(K, now, "follow_up", {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                             "run_id", run_id, "run_count", run_count, "message", ARGV[7]})
else
  emit(K, now, "completed", {"task_id", id, "board", t.board, "model", t.model, "provider", t.provider,
                             "run_id", run_id, "run_count", run_count, "message", note ~= "" and note or ARGV[7]})
end
breaker_after(K, P, t, now, "ok")
return {0, status, run_count, note}
