-- KEYS: user's device set, token owner key; ARGV: device key, user, now, max, prefix
local previous = redis.call('GET', KEYS[2])
if previous and previous ~= ARGV[2] then
  redis.call('ZREM', ARGV[5] .. 'devices:' .. previous, ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
local max = tonumber(ARGV[4])
if n > max then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, n - max - 1)) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('DEL', ARGV[5] .. 'device:' .. member)
  end
end
return 1
