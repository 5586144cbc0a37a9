-- A channel's position and kept publications (realtime/redis_history.py).
-- KEYS[1] the channel's stream, KEYS[2] its meta hash (e: epoch, s: latest offset,
-- r: the replication id of the master that set the epoch).
-- ARGV: 1 the first offset wanted ('' for the latest entries), 2 limit (0: position only),
--       3 a fresh epoch (used if the channel has none), 4 meta ttl (s),
--       5 the server's replication id as the caller's connection read it ('' : ask INFO).
-- Returns {epoch, latest offset, entries}: entries as XRANGE gives them, oldest first for
-- a first offset, newest first for the latest.
-- A new epoch as in history_publish.lua (new meta, or another replication id).
local replid = ARGV[5]
if replid == '' then
  replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
end
local meta = redis.call('HMGET', KEYS[2], 'e', 'r')
local epoch = meta[1]
if not epoch or meta[2] ~= replid then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[2], 'e', epoch, 'r', replid)
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
local top = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local limit = tonumber(ARGV[2])
local entries = {}
if limit > 0 then
  if ARGV[1] == '' then
    entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+', 'COUNT', limit)
  end
end
return {epoch, top, entries}
