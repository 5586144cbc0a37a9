-- Add (or re-arm) members of one channel (realtime/redis_channel_presence.py), after
-- channel_presence_prune.lua. KEYS[1] the channel's member ZSET (member "<user>\31<session>",
-- score: expiry in ms on Redis's clock), KEYS[2] its user HASH (user -> live members),
-- KEYS[3] its session HASH (session -> info JSON). ARGV[1] ttl ms, then triples: user,
-- session, info ('' none). Returns 1 when the channel's counts changed, else 0.
local ttl = tonumber(ARGV[1])
local changed = 0
if pruned > 0 then changed = 1 end
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
