-- Renew this worker's holder lease, then hand over the messages of holders whose lease
-- expired (see pipeq.worker.broker.handover). One atomic step, on Redis's own clock.
-- KEYS[1] holders (zset: holder -> lease expiry, ms), KEYS[2] kombu's unacked hash,
-- KEYS[3] kombu's unacked index, KEYS[4] owners (hash: delivery tag -> holder).
-- ARGV[1] this holder, ARGV[2] lease (ms), ARGV[3] held-hash key prefix, ARGV[4] reaped-marker
-- key prefix, ARGV[5] most holders to reap in one call, ARGV[6] marker lifetime (s),
-- ARGV[7] how long the hand-over keys outlive the last renewal (ms), ARGV[8] '1' for the
-- first renewal of a worker process, before it claims anything.
-- Returns {marker, holder, restored, holder, restored, ...}: marker is '' or, when this
-- holder had been declared dead while it could not renew, what the reaper recorded.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local lease = tonumber(ARGV[2])
local keep = tonumber(ARGV[7])
local fresh = ARGV[8] == '1'

-- Put back what ``holder`` still holds (not a message acknowledged since, restored by
-- kombu's visibility timeout or claimed by another worker); returns how many.
local function put_back(holder)
  local held = ARGV[3] .. holder
  local entries = redis.call('HGETALL', held)
  local restored = 0
  for i = 1, #entries, 2 do
    local tag = entries[i]
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
  redis.call('DEL', held)
  return restored
end

local out = {''}
local marker = redis.call('GET', ARGV[4] .. me)
if marker then
  redis.call('DEL', ARGV[4] .. me)
  if not fresh then out[1] = marker end
end
local mine = tonumber(redis.call('ZSCORE', KEYS[1], me))
if fresh and mine then
  -- A process that reuses the name of one that died (a fixed --hostname): what the dead one
  -- held goes back now, or this lease would keep it for the new process, which never knew it.
  local restored = put_back(me)
  if restored > 0 then
    out[#out + 1] = me
    out[#out + 1] = restored
  end
end
-- Only a holder that was not silent itself hands anything over: its own lease still runs
-- (or it is new). After a pause of Redis longer than a lease (a stall, a failover) every
-- lease has lapsed, and the first worker to renew would declare all the others dead; it
-- renews now, they renew within a beat, and the next round finds only the truly silent.
local may_reap = fresh or (mine ~= nil and mine >= now)
redis.call('ZADD', KEYS[1], now + lease, me)
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[4], keep)
redis.call('PEXPIRE', ARGV[3] .. me, keep)
if not may_reap then return out end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, holder in ipairs(dead) do
  local expired_at = tonumber(redis.call('ZSCORE', KEYS[1], holder))
  local restored = put_back(holder)
  redis.call('ZREM', KEYS[1], holder)
  redis.call('SET', ARGV[4] .. holder, cjson.encode({at_ms = now, by = me, restored = restored,
    silent_ms = now - expired_at + lease}), 'EX', ARGV[6])
  out[#out + 1] = holder
  out[#out + 1] = restored
end
return out
