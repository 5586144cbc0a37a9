-- KEYS: token owner key; ARGV: device key, prefix
local user = redis.call('GET', KEYS[1])
if not user then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2] .. 'devices:' .. user, ARGV[1])
return 1
