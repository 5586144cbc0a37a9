-- KEYS: stream, delayed, idempotency key (used only with a window)
-- ARGV: notification, state, max_depth, window_ms (0: no idempotency), id
if ARGV[4] ~= '0' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, 0}
end
local depth = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[3]) then
  return {-1, depth}
end
redis.call('XADD', KEYS[1], '*', 'n', ARGV[1], 's', ARGV[2])
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[4])
end
return {1, depth + 1}
