-- A channel's position (realtime/redis_history.py, after history_epoch.lua): its epoch
-- and latest offset. The kept publications are read by a plain XRANGE sent right after it
-- on the same connection (an XRANGE inside the script costs Redis 7x more: Lua tables both
-- ways).
-- KEYS[1] the channel's meta hash (e: epoch, s: latest offset, r: the replication id of
-- the master that set the epoch).
-- ARGV: 1 a fresh epoch (used if the channel has none), 2 meta ttl (s),
--       3 the server's replication id as the caller's connection read it ('' : ask INFO).
-- Returns {epoch, latest offset}.
local epoch = channel_epoch(KEYS[1], ARGV[1], ARGV[3]) -- history_epoch.lua
redis.call('EXPIRE', KEYS[1], ARGV[2])
local top = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
return {epoch, top}
