-- Remove one member of a channel (realtime/redis_channel_presence.py).
-- KEYS as in channel_presence_join.lua; ARGV[1] user, ARGV[2] session.
-- Returns 1 when the channel's counts changed, else 0.
if redis.call('ZREM', KEYS[1], ARGV[1] .. '\31' .. ARGV[2]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[2])
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
