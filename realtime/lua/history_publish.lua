-- One publication of a channel, atomically (realtime/redis_history.py), after
-- history_epoch.lua.
-- KEYS[1] the channel's stream, KEYS[2] its meta hash (e: epoch, s: latest offset,
-- r: the replication id of the master that set the epoch),
-- KEYS[3] (optional) the result hash of the caller's idempotency key.
-- ARGV: 1 payload, 2 history size, 3 history ttl (s), 4 pub/sub channel, 5 meta ttl (s),
--       6 a fresh epoch (used if the channel has none), 7 result ttl (ms),
--       8 deadline (unix ms; 0 none): past it, nothing is done,
--       9 PUBLISH or SPUBLISH (sharded pub/sub: the channel shares KEYS' hash tag),
--       10 the server's replication id as the caller's connection read it ('' : ask INFO).
-- Returns {offset, epoch, status}: status 0 published, 1 a duplicate (its first offset and
-- epoch), 2 not done (the deadline had passed).
local deadline = tonumber(ARGV[8])
if deadline > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > deadline then
    return {0, '', 2}
  end
end
if #KEYS == 3 then
  local seen = redis.call('HMGET', KEYS[3], 'e', 's')
  if seen[1] then
    return {tonumber(seen[2]), seen[1], 1}
  end
end
local epoch = channel_epoch(KEYS[2], ARGV[6], ARGV[10]) -- history_epoch.lua
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('EXPIRE', KEYS[2], ARGV[5])
if offset == 1 then
  redis.call('DEL', KEYS[1]) -- the meta was lost but an old stream survived: start clean
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[9] == 'SPUBLISH' then
  redis.call('SPUBLISH', ARGV[4], offset .. ' ' .. epoch .. ' ' .. ARGV[1])
else
  redis.call('PUBLISH', ARGV[4], offset .. ' ' .. epoch .. ' ' .. ARGV[1])
end
if #KEYS == 3 then
  redis.call('HSET', KEYS[3], 'e', epoch, 's', offset)
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
return {offset, epoch, 0}
