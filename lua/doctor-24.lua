--[[
  doctor: check every invariant of a namespace and, with ARGV[3] = 1, rebuild the derived
  state from the source of truth, atomically (a live queue is never half-repaired).
  An O(N) admin operation over the places, the `boards` set and the task hashes; never on the claim
  path.

  Source of truth: each task hash's status, the board queues, `running` and the status zsets.
  There is no index of every task (it would cost memory per task): the caller finds the task hashes
  with SCAN, which does not block Redis, and passes their ids; the places list the rest. A task added
  after the SCAN is in its place, so it is found there.
  Checked (and repaired):
    - each task is in exactly the place its status names (scheduled, scored by its due_at / board
      queue / running / status:in_review / status:failed / status:cancelled); a missing place is restored,
      an extra place is dropped; a place listing a task with no hash is cleaned
    - seq:task is at least every task id; `boards` lists every task's board
    - inflight:model / inflight:provider = in-progress tasks by their model / provider (a field at 0
      counts as absent: scripts leave a counter at 0 rather than spend a call deleting it)
    - a half-open breaker's probe (breaker:<provider> probe) is the active run of its task,
      else the probe slot is freed (a probe lost without a report would hold its provider)
    - blocked = what the caps, the (repaired) counters, the cooldown keys and the breakers imply
    - board:<b>.running = the board's in-progress task, and board:<b>.run = its run id, model and
      provider (a run claimed before boards kept `run` has none)
    - refs = unfinished (scheduled, up_next, in_progress) tasks per chain key
    - board:<b>.scheduled = the board's scheduled tasks; every queued night-only task is in
      night_queued (which may also hold night-only tasks in progress or finished: a claim outside the
      window forgets the finished ones)
    - each board is in exactly the index its state implies (reindex_board's rules; a due
      backoff still in idx:backoff is fine: the next claim moves it) and board.state/ck agree
    - ready:fronts = the place of each non-empty ready line's front board
    - cfg:claim = what the cfg:* hashes say (lib/core.lua claim_config); absent with no config
  Not repairable (reported only): an unknown status, two tasks of one board in progress.

  KEYS[1]  task_seq            STRING (at least every task id)
  KEYS[2]  boards              SET
  KEYS[3]  running             ZSET
  KEYS[4]  in_review           ZSET
  KEYS[5]  failed              ZSET
  KEYS[6]  cancelled           ZSET
  KEYS[7]  inflight_model      HASH
  KEYS[8]  inflight_provider   HASH
  KEYS[9]  ready_fronts        ZSET
  KEYS[10] ready_seq           STRING
  KEYS[11] idx_busy            SET
  KEYS[12] idx_paused          SET
  KEYS[13] idx_backoff         ZSET
  KEYS[14] refs                HASH
  KEYS[15] cfg_chains          HASH   (candidate chain keys c:<chain>)
  KEYS[16] cfg_model_provider  HASH   (candidate chain keys m:<model>)
  KEYS[17] events              STREAM (a `doctor` event when something was repaired)
  KEYS[18] cfg_model_cap       HASH
  KEYS[19] cfg_provider_cap    HASH
  KEYS[20] blocked             HASH
  KEYS[21] scheduled           ZSET   task id -> due time (ms)
  KEYS[22] night_queued        ZSET
  KEYS[23] cfg_settings        HASH
  KEYS[24] cfg_claim           STRING what a claim reads of the cfg:* hashes, JSON
  Built from ARGV[1]: board:<b>, board:<b>:queue, task:<id>, ready:<ck>, cooldown:<model>,
  breaker:<provider>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] repair (1/0)
  ARGV[4..] the ids of the task hashes (found by SCAN of task:*)

  Returns {0, n, problem_1 .. problem_n, repaired_1 .. repaired_m} -- the problems found
  (before any repair) and, in repair mode, one line per change made
]]
local rcall = redis.call
--- @include "core"

local K = {task_seq = KEYS[1], boards = KEYS[2], running = KEYS[3], in_review = KEYS[4], failed = KEYS[5],
           cancelled = KEYS[6], inflight_model = KEYS[7], inflight_provider = KEYS[8],
           ready_fronts = KEYS[9], ready_seq = KEYS[10], idx_busy = KEYS[11], idx_paused = KEYS[12],
           idx_backoff = KEYS[13], refs = KEYS[14], cfg_chains = KEYS[15], cfg_model_provider = KEYS[16],
           events = KEYS[17], cfg_model_cap = KEYS[18], cfg_provider_cap = KEYS[19], blocked = KEYS[20],
           scheduled = KEYS[21], night_queued = KEYS[22], cfg_settings = KEYS[23], cfg_claim = KEYS[24]}
local P, now, repair = ARGV[1], clock_ms(ARGV[2]), ARGV[3] == "1"

local problems, fixed = {}, {}
local function problem(msg) problems[#problems + 1] = msg end
local function fix(msg) fixed[#fixed + 1] = msg end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

local function sorted_keys(t, numeric)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  if numeric then
    table.sort(out, function(a, b) return tonumber(a) < tonumber(b) end)
  else
    table.sort(out)
  end
  return out
end

-- 1. Places -------------------------------------------------------------------------------------
local STATUS_PLACE = {in_progress = K.running, in_review = K.in_review, failed = K.failed,
                      cancelled = K.cancelled, scheduled = K.scheduled}
local PLACE_NAME = {[K.running] = "running", [K.scheduled] = "scheduled", [K.in_review] = "status:in_review",
                    [K.failed] = "status:failed", [K.cancelled] = "status:cancelled"}
local function place_name(key)
  return PLACE_NAME[key] or ("queue of board " .. string.sub(key, #P + 7, -7))
end

local board_set = set_of(rcall("SMEMBERS", K.boards))
local boards = {}
for b in pairs(board_set) do boards[b] = true end

local where, tasks = {}, {}   -- id -> {place key -> score}; id -> fields (false: no hash)
local function at(id, key, score)
  where[id] = where[id] or {}
  where[id][key] = score
end
-- Reads task `id` once; false when it has no hash (a place lists it) or nothing when `walking`.
local function load(id, walking)
  if tasks[id] ~= nil then return true end
  local v = rcall("HMGET", task_key(P, id), "board", "status", "ck", "model", "provider",
                  "lease_deadline", "finished_at", "due_at", "night", "run_id", "night_run")
  if not v[1] and not v[2] and rcall("EXISTS", task_key(P, id)) == 0 then
    if not walking then tasks[id] = false end
    return false
  end
  tasks[id] = {board = v[1], status = v[2], ck = v[3], model = v[4], provider = v[5],
               lease_deadline = v[6], finished_at = v[7], due_at = v[8], night = v[9] == "1",
               run_id = v[10], night_run = v[11]}
  if v[1] then boards[v[1]] = true end
  return true
end

-- Every task hash: the caller found them with SCAN (ARGV[4..]), so a task in no place is found too.
for i = 4, #ARGV do load(ARGV[i], true) end

for _, key in ipairs({K.scheduled, K.running, K.in_review, K.failed, K.cancelled}) do
  local r = rcall("ZRANGE", key, 0, -1, "WITHSCORES")
  for i = 1, #r, 2 do
    at(r[i], key, r[i + 1])
    load(r[i])
  end
end
for _, b in ipairs(sorted_keys(boards)) do
  local q = queue_key(P, b)
  for _, id in ipairs(rcall("ZRANGE", q, 0, -1)) do
    at(id, q, id)
    load(id)
  end
end

local counts = {model = {}, provider = {}, refs = {}, scheduled = {}}
local night_queued = set_of(rcall("ZRANGE", K.night_queued, 0, -1))
local top                 -- the highest task id that has a hash
local runs_on = {}        -- board -> list of in-progress task ids
local cks = {}            -- candidate chain keys of ready lines
local function bump(t, k) if k and k ~= "" then t[k] = (t[k] or 0) + 1 end end

for _, id in ipairs(sorted_keys(tasks, true)) do
  local t = tasks[id]
  local places = where[id] or {}
  if not t then
    problem("task " .. id .. " has no hash but is listed in " .. place_name(next(places)))
    if repair then
      for key in pairs(places) do rcall("ZREM", key, id) end
      fix("dropped task " .. id .. " (no hash) from every index")
    end
  else
    top = id
    if t.board and not board_set[t.board] then
      board_set[t.board] = true
      problem("board " .. t.board .. " (of task " .. id .. ") is missing from the boards set")
      if repair then
        rcall("SADD", K.boards, t.board)
        fix("added board " .. t.board .. " to the boards set")
      end
    end
    local expected
    if t.status == "up_next" then
      if t.board then expected = queue_key(P, t.board) end
    else
      expected = STATUS_PLACE[t.status or ""]
    end
    if not expected then
      problem("task " .. id .. " has unknown status '" .. tostring(t.status) .. "' (not repairable)")
    else
      for _, key in ipairs(sorted_keys(places)) do
        if key ~= expected then
          problem("task " .. id .. " (" .. t.status .. ") is also in " .. place_name(key))
          if repair then
            rcall("ZREM", key, id)
            fix("removed task " .. id .. " from " .. place_name(key))
          end
        end
      end
      if not places[expected] then
        problem("task " .. id .. " (" .. t.status .. ") is missing from " .. place_name(expected))
        if repair then
          local score = id
          if expected == K.running then
            score = t.lease_deadline or int(now)
          elseif expected == K.scheduled then
            score = t.due_at or int(now)
          elseif t.status ~= "up_next" then
            score = t.finished_at or int(now)
          end
          rcall("ZADD", expected, score, id)
          fix("put task " .. id .. " back in " .. place_name(expected))
        end
      elseif expected == K.running and t.lease_deadline and
             tonumber(places[expected]) ~= tonumber(t.lease_deadline) then
        problem("task " .. id .. " is in running until " .. places[expected] ..
                ", its lease_deadline says " .. t.lease_deadline)
        if repair then
          rcall("ZADD", K.running, t.lease_deadline, id)
          fix("set task " .. id .. "'s running score to its lease_deadline")
        end
      elseif expected == K.scheduled and t.due_at and tonumber(places[expected]) ~= tonumber(t.due_at) then
        problem("task " .. id .. " is in scheduled until " .. places[expected] .. ", its due_at says " .. t.due_at)
        if repair then
          rcall("ZADD", K.scheduled, t.due_at, id)
          fix("set task " .. id .. "'s scheduled score to its due_at")
        end
      end
    end
    if t.status == "in_progress" then
      bump(counts.model, t.model)
      bump(counts.provider, t.provider)
      runs_on[t.board or ""] = runs_on[t.board or ""] or {}
      table.insert(runs_on[t.board or ""], id)
    end
    if t.status == "up_next" or t.status == "in_progress" or t.status == "scheduled" then
      bump(counts.refs, t.ck)
    end
    if t.status == "scheduled" then bump(counts.scheduled, t.board) end
    if t.status == "up_next" and t.night and not night_queued[id] then
      problem("night-only task " .. id .. " is queued but missing from night_queued")
      if repair then
        rcall("ZADD", K.night_queued, id, id)
        fix("added task " .. id .. " to night_queued")
      end
    end
    if t.ck and t.ck ~= "" then cks[t.ck] = true end
  end
end

local seq = num(rcall("GET", K.task_seq), 0)
if top and tonumber(top) > seq then
  problem("seq:task is " .. int(seq) .. ", below task " .. top .. " (the next auto id would be taken)")
  if repair then
    rcall("SET", K.task_seq, top)
    fix("set seq:task to " .. top)
  end
end

-- 2. Counters: inflight, refs -----------------------------------------------------------------
-- zero_is_absent: a field at 0 counts as absent (the inflight counters stay at 0 when their runs end).
local function sync_counts(key, label, expected, zero_is_absent)
  local actual = {}
  local raw = rcall("HGETALL", key)
  for i = 1, #raw, 2 do
    if not (zero_is_absent and raw[i + 1] == "0") then actual[raw[i]] = raw[i + 1] end
  end
  local fields = {}
  for f in pairs(actual) do fields[f] = true end
  for f in pairs(expected) do fields[f] = true end
  for _, f in ipairs(sorted_keys(fields)) do
    local want = expected[f]
    if actual[f] ~= (want and tostring(want) or nil) then
      problem(label .. " " .. f .. " is " .. (actual[f] or "absent") .. ", expected " .. (want or "absent"))
      if repair then
        if want then rcall("HSET", key, f, want) else rcall("HDEL", key, f) end
        fix("set " .. label .. " " .. f .. " to " .. (want or "absent"))
      end
    end
  end
end
sync_counts(K.inflight_model, "inflight:model", counts.model, true)
sync_counts(K.inflight_provider, "inflight:provider", counts.provider, true)
sync_counts(K.refs, "refs", counts.refs)
-- A breaker's probe must be a run in progress: one that ended without telling the breaker (a lost
-- report, a repair) would hold its provider half-open with a probe out for ever.
local provider_seen = {}
for _, p in ipairs(rcall("HVALS", K.cfg_model_provider)) do
  if not provider_seen[p] then
    provider_seen[p] = true
    local b = rcall("HMGET", breaker_key(P, p), "probe", "probe_task")
    if b[1] then
      local t = rcall("HMGET", task_key(P, b[2] or "0"), "status", "run_id")
      if t[1] ~= "in_progress" or t[2] ~= b[1] then
        problem("breaker " .. p .. ": probe run " .. b[1] .. " of task " .. (b[2] or "?") .. " is not running")
        if repair then
          rcall("HDEL", breaker_key(P, p), "probe", "probe_task")
          fix("freed the probe slot of breaker " .. p)
        end
      end
    end
  end
end

-- The model blocks follow the counters (repaired above), the caps, the cooldown keys and the breakers.
-- An ended cooldown still listed blocks nothing, so it is left alone.
local blocks = derived_blocks(K, P, now)
for f, v in pairs(hash_table(K.blocked)) do
  if string.sub(f, 1, 2) == "c:" and not blocks[f] and cooldown_end(v) <= now then blocks[f] = v end
end
sync_counts(K.blocked, "blocked", blocks)

-- 3. Board running slots ----------------------------------------------------------------------
-- Board b's `field` holds `actual` and should hold `want` (false: none): a difference is reported as its
-- `what` and, when repairing, the field is written or deleted.
local function sync_board_field(b, field, what, actual, want)
  if actual == want then return end
  problem("board " .. b .. " " .. what .. " is " .. (actual or "empty") .. ", expected " .. (want or "empty"))
  if repair then
    if want then rcall("HSET", board_key(P, b), field, want) else rcall("HDEL", board_key(P, b), field) end
    fix("set board " .. b .. " " .. what .. " to " .. (want or "empty"))
  end
end

local board_list = sorted_keys(board_set)
for _, b in ipairs(board_list) do
  local ids = runs_on[b] or {}
  local actual = rcall("HGET", board_key(P, b), "running")
  if actual == "" then actual = false end  -- a run's end leaves it "" (none)
  local n_sched = rcall("HGET", board_key(P, b), "scheduled")
  local want_sched = counts.scheduled[b] and tostring(counts.scheduled[b]) or false
  if n_sched ~= want_sched then
    problem("board " .. b .. " counts " .. (n_sched or "no") .. " scheduled tasks, expected " ..
            (want_sched or "none"))
    if repair then
      if want_sched then rcall("HSET", board_key(P, b), "scheduled", want_sched)
      else rcall("HDEL", board_key(P, b), "scheduled") end
      fix("set board " .. b .. " scheduled count to " .. (want_sched or "none"))
    end
  end
  if #ids > 1 then
    problem("board " .. b .. " has " .. #ids .. " tasks in progress: " .. table.concat(ids, ",") ..
            " (not repairable)")
  else
    local want = ids[1]
    sync_board_field(b, "running", "running slot", actual, want or false)
    -- the run's facts for the reaper (a run claimed before boards kept them has none)
    local t = want and tasks[want]
    local want_run = t and t.night_run and t.run_id and
                     (t.run_id .. "|" .. (t.model or "") .. "|" .. (t.provider or "")) or false
    local run = rcall("HGET", board_key(P, b), "run")
    sync_board_field(b, "run", "run", run ~= "" and run or false, want_run)
  end
end

-- 4. Board indexes ----------------------------------------------------------------------------
for _, ck in ipairs(rcall("ZRANGE", K.ready_fronts, 0, -1)) do cks[ck] = true end
for _, f in ipairs(rcall("HKEYS", K.refs)) do cks[f] = true end
for _, f in ipairs(rcall("HKEYS", K.cfg_chains)) do cks["c:" .. f] = true end
for _, f in ipairs(rcall("HKEYS", K.cfg_model_provider)) do cks["m:" .. f] = true end
for _, b in ipairs(board_list) do
  local ck = rcall("HGET", board_key(P, b), "ck")
  if ck then cks[ck] = true end
end
local ck_list = sorted_keys(cks)

-- index name -> members (ready lines as "ready:<ck>")
local function memberships()
  local of = {}
  local function add(b, name, score)
    of[b] = of[b] or {}
    of[b][name] = score or true
  end
  for _, ck in ipairs(ck_list) do
    for _, b in ipairs(rcall("ZRANGE", ready_key(P, ck), 0, -1)) do add(b, "ready:" .. ck) end
  end
  for _, b in ipairs(rcall("SMEMBERS", K.idx_busy)) do add(b, "idx:busy") end
  for _, b in ipairs(rcall("SMEMBERS", K.idx_paused)) do add(b, "idx:paused") end
  local r = rcall("ZRANGE", K.idx_backoff, 0, -1, "WITHSCORES")
  for i = 1, #r, 2 do add(r[i], "idx:backoff", tonumber(r[i + 1])) end
  return of
end

local function leave(b, name)
  if name == "idx:busy" then rcall("SREM", K.idx_busy, b)
  elseif name == "idx:paused" then rcall("SREM", K.idx_paused, b)
  elseif name == "idx:backoff" then rcall("ZREM", K.idx_backoff, b)
  else rcall("ZREM", ready_key(P, string.sub(name, 7)), b) end
end

local of = memberships()
for _, b in ipairs(sorted_keys(of)) do
  if not board_set[b] then
    for _, name in ipairs(sorted_keys(of[b])) do
      problem(name .. " lists board " .. b .. ", which is not in the boards set")
      if repair then
        leave(b, name)
        fix("removed board " .. b .. " from " .. name)
      end
    end
  end
end

local INDEX = {busy = "idx:busy", paused = "idx:paused", backoff = "idx:backoff"}
for _, b in ipairs(board_list) do
  local state, ck, until_ms = state_of(P, b, now)
  local in_idx = of[b] or {}
  if state == "ready" and type(in_idx["idx:backoff"]) == "number" then
    -- a due backoff: the next claim moves the board to its ready line
    local head = rcall("ZRANGE", queue_key(P, b), 0, 0)[1]
    local bu = num(rcall("HGET", task_key(P, head), "backoff_until"), 0)
    if bu > 0 and bu == in_idx["idx:backoff"] then state, ck, until_ms = "backoff", nil, bu end
  end
  local want = INDEX[state] or (state == "ready" and "ready:" .. ck) or nil
  for _, name in ipairs(sorted_keys(in_idx)) do
    local score_ok = name ~= "idx:backoff" or in_idx[name] == until_ms
    if name ~= want or not score_ok then
      problem("board " .. b .. " (" .. state .. ") is in " .. name ..
              (name == want and " with the wrong backoff end" or ""))
      if repair then
        leave(b, name)
        fix("removed board " .. b .. " from " .. name)
      end
      in_idx[name] = nil
    end
  end
  local bf = rcall("HMGET", board_key(P, b), "state", "ck")
  if want and not in_idx[want] then
    problem("board " .. b .. " (" .. state .. ") is missing from " .. want)
    if repair then
      rcall("HDEL", board_key(P, b), "state", "ck")
      reindex_board(K, P, b, now)
      fix("put board " .. b .. " in " .. want)
    end
  elseif (bf[1] or "idle") ~= state or (state == "ready" and bf[2] ~= ck) then
    problem("board " .. b .. " says state " .. (bf[1] or "none") .. (bf[2] and (" ck " .. bf[2]) or "") ..
            ", expected " .. state .. (ck and (" ck " .. ck) or ""))
    if repair then
      if ck then rcall("HSET", board_key(P, b), "state", state, "ck", ck)
      else
        rcall("HSET", board_key(P, b), "state", state)
        rcall("HDEL", board_key(P, b), "ck")
      end
      fix("set board " .. b .. " state to " .. state)
    end
  end
end

-- 5. ready:fronts = the place of each non-empty ready line's front board ----------------------------
for _, ck in ipairs(ck_list) do
  local front = rcall("ZRANGE", ready_key(P, ck), 0, 0, "WITHSCORES")[2]
  local listed = rcall("ZSCORE", K.ready_fronts, ck)
  if front and not listed then
    problem("ready:fronts is missing " .. ck .. ", whose line is not empty")
  elseif listed and not front then
    problem("ready:fronts lists " .. ck .. ", whose line is empty")
  elseif front and tonumber(front) ~= tonumber(listed) then
    problem("ready:fronts places " .. ck .. " at " .. listed .. ", its line's front board is at " .. front)
  end
  if repair and tonumber(front) ~= tonumber(listed) then
    if front then
      rcall("ZADD", K.ready_fronts, front, ck)
      fix("set " .. ck .. " in ready:fronts to " .. front)
    else
      rcall("ZREM", K.ready_fronts, ck)
      fix("removed " .. ck .. " from ready:fronts")
    end
  end
end

-- 5. The compiled config ---------------------------------------------------------------------
-- cfg:claim is what a claim reads of the config: it must say what the cfg:* hashes say.
local function same_doc(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do
    if not same_doc(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end
local want_conf, raw_conf = claim_config(K), rcall("GET", K.cfg_claim)
local conf_ok, have_conf = false, nil
if raw_conf then conf_ok, have_conf = pcall(cjson.decode, raw_conf) end
local conf_problem
if not want_conf then
  if raw_conf then conf_problem = "cfg:claim exists, but no config is loaded (cfg:settings is missing)" end
elseif not raw_conf then
  conf_problem = "cfg:claim is missing (claims fail without it)"
elseif not conf_ok then
  conf_problem = "cfg:claim is unreadable (not JSON)"
elseif not same_doc(want_conf, have_conf) then
  conf_problem = "cfg:claim disagrees with the cfg:* hashes (it says version " ..
                 tostring(type(have_conf) == "table" and have_conf.version) .. ", they say " .. int(want_conf.version) .. ")"
end
if conf_problem then
  problem(conf_problem)
  if repair and want_conf then
    rcall("SET", K.cfg_claim, cjson.encode(want_conf))
    fix("rewrote cfg:claim from the cfg:* hashes (version " .. int(want_conf.version) .. ")")
  elseif repair then
    rcall("DEL", K.cfg_claim)
    fix("deleted cfg:claim (no config is loaded)")
  end
end

if repair and #fixed > 0 then
  emit(K, now, "doctor", {"problems", #problems, "repaired", #fixed})
end

local out = {0, #problems}
for _, p in ipairs(problems) do out[#out + 1] = p end
for _, f in ipairs(fixed) do out[#out + 1] = f end
return out
