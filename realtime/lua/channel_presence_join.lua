-- Add (or re-arm) members of one channel (realtime/redis_channel_presence.py).
-- KEYS[1] the channel's member ZSET (member "<user>\31<session>", score: expiry in ms on
-- Redis's clock), KEYS[2] its user HASH (user -> live members), KEYS[3] its session HASH
-- (session -> info JSON). ARGV[1] ttl ms, then triples: user, session, info ('' none).
-- Expired members are removed first, with the same bookkeeping as a leave.
-- Returns 1 when the channel's counts changed, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local changed = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  local sep = string.find(member, '\31', 1, true)
  local user = string.sub(member, 1, sep - 1)
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[3], string.sub(member, sep + 1))
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then redis.call('HDEL', KEYS[2], user) end
  changed = 1
end
for i = 2, #ARGV, 3 do
  local user, session, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('ZADD', KEYS[1], now + ttl, user .. '\31' .. session) == 1 then
    redis.call('HINCRBY', KEYS[2], user, 1)
    changed = 1
  end
  if info ~= '' then redis.call('HSET', KEYS[3], session, info) end
end
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
return changed
