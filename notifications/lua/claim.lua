-- KEYS[1..4]: streams, highest priority first; KEYS[5..8]: their delayed sets
-- ARGV: group, consumer, now, min_idle_ms, reclaim ('1' or '0'), promote_limit, 4 cursors
-- Returns {rank, id, fields, reclaimed, cursors, deliveries} or, with nothing to hand out,
-- {0, '', {}, 0, cursors, last ids, next due}. A delayed member that is not
-- [notification, state] goes back as an entry {raw = member}, for the caller to dead-letter.
local group, consumer, now = ARGV[1], ARGV[2], ARGV[3]
for i = 1, 4 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[4 + i], '-inf', now, 'LIMIT', 0, ARGV[6])
  for _, member in ipairs(due) do
    local ok, item = pcall(cjson.decode, member)
    if ok and type(item) == 'table' and type(item[1]) == 'string' and type(item[2]) == 'string' then
      redis.call('XADD', KEYS[i], '*', 'n', item[1], 's', item[2])
    else
      redis.call('XADD', KEYS[i], '*', 'raw', member)
    end
    redis.call('ZREM', KEYS[4 + i], member)
  end
end
local cursors = {ARGV[7], ARGV[8], ARGV[9], ARGV[10]}
for i = 1, 4 do
  if ARGV[5] == '1' then
    local r = redis.call('XAUTOCLAIM', KEYS[i], group, consumer, ARGV[4], cursors[i], 'COUNT', 1)
    cursors[i] = r[1]
    local e = r[2][1]
    if type(e) == 'table' and type(e[2]) == 'table' then
      local p = redis.call('XPENDING', KEYS[i], group, e[1], e[1], 1)
      return {i, e[1], e[2], 1, cursors, p[1][4]}
    end
  end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[i], '>')
  if r then
    local e = r[1][2][1]
    return {i, e[1], e[2], 0, cursors, 1}
  end
end
local last = {}
for i = 1, 4 do
  local info = redis.call('XINFO', 'STREAM', KEYS[i])
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then last[i] = info[j + 1] end
  end
end
local next_due = ''
for i = 1, 4 do
  local first = redis.call('ZRANGE', KEYS[4 + i], 0, 0, 'WITHSCORES')
  if first[2] and (next_due == '' or tonumber(first[2]) < tonumber(next_due)) then
    next_due = first[2]
  end
end
return {0, '', {}, 0, cursors, last, next_due}
