-- The first part of every channel presence script (realtime/redis_channel_presence.py
-- prepends it): remove the members of KEYS (see channel_presence_join.lua) whose expiry
-- has passed, with the same bookkeeping as a leave. Leaves `now` (ms, Redis's clock) and
-- `pruned` (how many were removed) to the script that follows.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pruned = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  local sep = string.find(member, '\31', 1, true)
  local user = string.sub(member, 1, sep - 1)
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[3], string.sub(member, sep + 1))
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then redis.call('HDEL', KEYS[2], user) end
  pruned = pruned + 1
end
