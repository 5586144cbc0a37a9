-- KEYS: users' ZSETs (member conn_id, score expiry in ms on Redis's clock); ARGV[1]: ttl ms,
-- ARGV[i + 1]: the conn_id for KEYS[i]. For each in turn, atomically: drop the expired
-- entries, add (or re-arm) the conn_id, count. Returns the counts, in KEYS order.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
  counts[i] = redis.call('ZCARD', key)
end
return counts
