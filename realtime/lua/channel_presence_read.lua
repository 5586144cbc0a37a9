-- A channel's live presence (realtime/redis_channel_presence.py), after
-- channel_presence_prune.lua. KEYS as in channel_presence_join.lua; ARGV[1]: 'counts',
-- 'sessions' or 'members'. Returns {users, connections}, or the session infos, or the
-- user ids.
if ARGV[1] == 'sessions' then return redis.call('HVALS', KEYS[3]) end
if ARGV[1] == 'members' then return redis.call('HKEYS', KEYS[2]) end
return {redis.call('HLEN', KEYS[2]), redis.call('ZCARD', KEYS[1])}
