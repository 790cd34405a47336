-- Renew this worker's holder lease, then hand over the messages of holders whose lease
-- expired (see pipeq.worker.broker.handover). One atomic step, on Redis's own clock.
-- KEYS[1] holders (zset: holder -> lease expiry, ms), KEYS[2] kombu's unacked hash,
-- KEYS[3] kombu's unacked index, KEYS[4] owners (hash: delivery tag -> holder).
-- ARGV[1] this holder, ARGV[2] lease (ms), ARGV[3] held-hash key prefix, ARGV[4] reaped-marker
-- key prefix, ARGV[5] most holders to reap in one call, ARGV[6] marker lifetime (s),
-- ARGV[7] how long the hand-over keys outlive the last renewal (ms).
-- Returns {marker, holder, restored, holder, restored, ...}: marker is '' or, when this
-- holder had been declared dead while it could not renew, what the reaper recorded.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local keep = tonumber(ARGV[7])
local marker = ARGV[4] .. me
local out = {redis.call('GET', marker) or ''}
if out[1] ~= '' then redis.call('DEL', marker) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), me)
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[4], keep)
redis.call('PEXPIRE', ARGV[3] .. me, keep)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, holder in ipairs(dead) do
  local held = ARGV[3] .. holder
  local entries = redis.call('HGETALL', held)
  local restored = 0
  for i = 1, #entries, 2 do
    local tag = entries[i]
    -- Only what the holder still holds: a message acknowledged, restored by kombu's
    -- visibility timeout or claimed since by another worker is not the dead holder's.
    if redis.call('HGET', KEYS[4], tag) == holder then
      redis.call('HDEL', KEYS[4], tag)
      local entry = redis.call('HGET', KEYS[2], tag)
      -- What the claim recorded: the item's length, its queue, its doorbell (claim.lua).
      local length, queue, bell = string.match(entries[i + 1], '^(%d+)\n([^\n]+)\n([^\n]+)$')
      if entry and length then
        -- The claim wrote '[' item ',' EX ',' RK ']': the item is the message as published.
        local item = string.sub(entry, 2, 1 + tonumber(length))
        redis.call('RPUSH', queue, item)  -- the right end: served next
        if redis.call('LLEN', bell) == 0 then redis.call('LPUSH', bell, '1') end
        redis.call('HDEL', KEYS[2], tag)
        redis.call('ZREM', KEYS[3], tag)
        restored = restored + 1
      end
    end
  end
  local expired_at = tonumber(redis.call('ZSCORE', KEYS[1], holder))
  redis.call('DEL', held)
  redis.call('ZREM', KEYS[1], holder)
  redis.call('SET', ARGV[4] .. holder, cjson.encode({at_ms = now, by = me, restored = restored,
    silent_ms = now - expired_at + tonumber(ARGV[2])}), 'EX', ARGV[6])
  out[#out + 1] = holder
  out[#out + 1] = restored
end
return out
