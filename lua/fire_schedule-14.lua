--[[
  fire_schedule: one firing of a recurring schedule, exactly once. The firing is keyed by the schedule
  and its firing time: it happens only while the schedule's score in `schedules` still is the time the
  caller read (ARGV[4]), and it moves the score on to the next firing time in the same script, so of
  several dispatchers (or a restarted one) that saw the same firing, one fires and the others get
  code 8. The caller computes the times from the cron expression and the zone (broker/schedules.py).

  A firing adds a new task to the schedule's board, unless the task of the previous firing is still
  unfinished (scheduled, up_next or in_progress): then it is skipped (event schedule_skipped), so a
  schedule never piles up. Mode "missed": the firing was missed by more than one period (everything
  was down): nothing is added (event schedule_missed), the schedule moves on.

  KEYS[1]  schedules           ZSET   schedule id -> next firing time (ms)
  KEYS[2]  task_seq            STRING
  KEYS[3]  boards              SET
  KEYS[4]  cfg_chains          HASH
  KEYS[5]  cfg_model_provider  HASH
  KEYS[6]  refs                HASH
  KEYS[7]  ready_fronts        ZSET
  KEYS[8]  ready_seq           STRING
  KEYS[9]  idx_busy            SET
  KEYS[10] idx_paused          SET
  KEYS[11] idx_backoff         ZSET
  KEYS[12] events              STREAM
  KEYS[13] scheduled           ZSET
  KEYS[14] night_queued        ZSET
  Built from ARGV[1]: schedule:<id>, task:<id>, board:<b>, board:<b>:queue, ready:<ck>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] schedule id
  ARGV[4] the firing time the caller read (the schedule's score)  ARGV[5] the firing done (ms; the
  latest one due, which is ARGV[4] unless firings were missed)  ARGV[6] the next firing time (ms)
  ARGV[7] mode: "fire" or "missed"  ARGV[8] the new task's due time (ms or "", the board's night rule)
  ARGV[9] "1" when the board is night-only, else ""

  Returns {0, "fired", task_id, status} | {0, "skipped", unfinished task id} | {0, "missed"}
          | {8} this firing happened already | {1, message} no such schedule | {5, message} its chain or
          model is no longer in the config (the schedule moves on; event schedule_failed)
]]
local rcall = redis.call
--- @include "core"

local K = {schedules = KEYS[1], task_seq = KEYS[2], boards = KEYS[3], cfg_chains = KEYS[4],
           cfg_model_provider = KEYS[5], refs = KEYS[6], ready_fronts = KEYS[7], ready_seq = KEYS[8],
           idx_busy = KEYS[9], idx_paused = KEYS[10], idx_backoff = KEYS[11], events = KEYS[12],
           scheduled = KEYS[13], night_queued = KEYS[14]}
local P, now, sid = ARGV[1], clock_ms(ARGV[2]), ARGV[3]
local score = rcall("ZSCORE", K.schedules, sid)
if not score then return {1, "no schedule " .. sid} end
if tonumber(score) ~= tonumber(ARGV[4]) then return {8} end
rcall("ZADD", K.schedules, "XX", ARGV[6], sid)

local sk = schedule_key(P, sid)
local s = rcall("HMGET", sk, "board", "ck", "title", "prompt", "last_task")
rcall("HSET", sk, "last_fire", ARGV[5])
if ARGV[7] == "missed" then
  rcall("HINCRBY", sk, "missed", 1)
  emit(K, now, "schedule_missed", {"schedule", sid, "board", s[1], "message", "missed by more than one period",
                                   "fire", ARGV[5], "next", ARGV[6]})
  return {0, "missed"}
end
if s[5] then
  local st = rcall("HGET", task_key(P, s[5]), "status")
  if st == "scheduled" or st == "up_next" or st == "in_progress" then
    rcall("HINCRBY", sk, "skipped", 1)
    emit(K, now, "schedule_skipped", {"schedule", sid, "board", s[1], "task_id", s[5],
                                      "message", "the previous task is still " .. st, "next", ARGV[6]})
    return {0, "skipped", tonumber(s[5])}
  end
end
local kind, name = string.sub(s[2], 1, 1), string.sub(s[2], 3)
local reply = new_task(K, P, now, {id = "", board = s[1], title = s[3], prompt = s[4] or "",
                                   chain = kind == "c" and name or "", pinned = kind == "m" and name or "",
                                   due = ARGV[8], night = ARGV[9], not_before = "", schedule = sid})
if reply[1] ~= 0 then
  emit(K, now, "schedule_failed", {"schedule", sid, "board", s[1], "message", reply[2], "next", ARGV[6]})
  return reply
end
rcall("HSET", sk, "last_task", int(reply[2]))
rcall("HINCRBY", sk, "fired", 1)
return {0, "fired", reply[2], reply[3]}
