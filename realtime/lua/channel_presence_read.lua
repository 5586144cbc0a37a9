-- A channel's live presence (realtime/redis_channel_presence.py).
-- KEYS as in channel_presence_join.lua; ARGV[1]: 'counts', 'sessions' or 'members'.
-- Expired members are removed first, with the same bookkeeping as a leave.
-- Returns {users, connections}, or the session infos, or the user ids.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  local sep = string.find(member, '\31', 1, true)
  local user = string.sub(member, 1, sep - 1)
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[3], string.sub(member, sep + 1))
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then redis.call('HDEL', KEYS[2], user) end
end
if ARGV[1] == 'sessions' then return redis.call('HVALS', KEYS[3]) end
if ARGV[1] == 'members' then return redis.call('HKEYS', KEYS[2]) end
return {redis.call('HLEN', KEYS[2]), redis.call('ZCARD', KEYS[1])}
