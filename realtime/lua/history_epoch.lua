-- Prepended to history_publish.lua and history_read.lua when they are loaded
-- (realtime/redis_history.py). The epoch of a channel whose meta hash is ``meta``: a new
-- one, ``fresh``, when the meta is new or was written under another replication id (a
-- failover or a restart: the top offset may have lost publications clients saw).
-- ``replid``: the server's replication id as the caller's connection read it ('': ask INFO).
local function channel_epoch(meta, fresh, replid)
  if replid == '' then
    replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
  end
  local kept = redis.call('HMGET', meta, 'e', 'r')
  if kept[1] and kept[2] == replid then
    return kept[1]
  end
  redis.call('HSET', meta, 'e', fresh, 'r', replid)
  return fresh
end
