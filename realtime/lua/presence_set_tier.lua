-- KEYS: users' tier keys; ARGV[1]: ttl ms, ARGV[i + 1]: the tier for KEYS[i]. Returns 1s.
local done = {}
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
  done[i] = 1
end
return done
