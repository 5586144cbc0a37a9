-- KEYS: stream, delayed, dead; ARGV: group, consumer, id, due ('' = done), member,
-- max dead letters, dead letters...
-- First, as in touch.lua: 0 unless the consumer still holds the entry.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
end
for i = 7, #ARGV do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'd', ARGV[i])
end
return 1
