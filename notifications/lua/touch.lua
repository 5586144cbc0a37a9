-- KEYS[1]: stream; ARGV: group, consumer, id. Returns 0 (and changes nothing) unless the
-- consumer still holds the entry (as settle.lua checks too), else re-arms its lease: 1.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
