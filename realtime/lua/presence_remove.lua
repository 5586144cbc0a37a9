-- KEYS: users' ZSETs; ARGV[i]: the conn_id to forget from KEYS[i]. Returns ZREM's replies.
local removed = {}
for i, key in ipairs(KEYS) do
  removed[i] = redis.call('ZREM', key, ARGV[i])
end
return removed
