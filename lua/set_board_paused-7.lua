--[[
  set_board_paused: pause or resume a board. A paused board keeps its queue and its
  running task (which may finish) but no task of it is claimed until it is resumed.

  KEYS[1] boards        SET
  KEYS[2] ready_fronts  ZSET
  KEYS[3] ready_seq     STRING
  KEYS[4] idx_busy      SET
  KEYS[5] idx_paused    SET
  KEYS[6] idx_backoff   ZSET
  KEYS[7] events        STREAM
  Built from ARGV[1]: board:<b>, board:<b>:queue, ready:<ck>

  ARGV[1] prefix  ARGV[2] now (ms; "" = the server's TIME)  ARGV[3] board  ARGV[4] paused (1/0)

  Returns {0, state} -- the board's index state afterwards (idle, paused, busy, backoff, ready)
]]
local rcall = redis.call
--- @include "core"

local K = {ready_fronts = KEYS[2], ready_seq = KEYS[3], idx_busy = KEYS[4], idx_paused = KEYS[5],
           idx_backoff = KEYS[6], events = KEYS[7]}
local P, now, b = ARGV[1], clock_ms(ARGV[2]), ARGV[3]
rcall("SADD", KEYS[1], b)
rcall("HSET", board_key(P, b), "paused", ARGV[4])
local state = reindex_board(K, P, b, now)
emit(K, now, ARGV[4] == "1" and "paused" or "resumed", {"board", b})
return {0, state}
