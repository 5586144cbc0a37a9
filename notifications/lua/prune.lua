-- KEYS: streams; ARGV: group, min_idle_ms. Deletes the group's consumers idle for longer
-- than min_idle_ms that hold no pending entry; returns {stream, consumer, ...} deleted.
local removed = {}
for i = 1, #KEYS do
  local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[i], ARGV[1])
  if consumers.err == nil then
    for _, c in ipairs(consumers) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], info['name'])
        table.insert(removed, KEYS[i])
        table.insert(removed, info['name'])
      end
    end
  end
end
return removed
