-- Claim the oldest messages of a route's queues (see pipeq.worker.broker.claiming).
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] the queues' doorbell
-- (pipeq.core.publish), KEYS[4] the holders' owner hash (delivery tag -> holder), KEYS[5]
-- this holder's held hash (pipeq.worker.broker.handover), KEYS[6..] queue lists in the order
-- to serve.
-- ARGV[1] the claim time (the client's clock, as kombu's restore compares with it),
-- ARGV[2] the most messages to take, ARGV[3] the holder ('' : no hand-over records),
-- ARGV[4] how long the hand-over records outlive the claim (ms; renewals extend it).
-- Returns {more, key, item, recorded, key, item, recorded, ...}: more is 1 while a queue
-- still holds a message. Leaving every queue empty, the claim silences the doorbell: waiting
-- workers then block. Each unacked entry is built from the item's own bytes
-- ('[' item ',' EX ',' RK ']'), so it is byte-for-byte the message kombu would restore. An
-- item that is not a kombu message is returned unrecorded: the transport dead-letters it and
-- nothing would ever restore it.
-- With a holder, the same step records who holds the message and where it came from (its
-- length inside the unacked entry, its queue and its doorbell, one per line: keys hold no
-- newline), so that live workers can put it back, byte for byte, once the holder's lease
-- expires (lua/lease.lua).
local out = {0}
local wanted = tonumber(ARGV[2]) or 1
local holder = ARGV[3] or ''
local taken = 0
for i = 6, #KEYS do
  while taken < wanted do
    -- Read, record, and only then pop: a Redis at maxmemory refuses the record (HSET) before
    -- anything was taken, so a full Redis can never make a claim lose a message.
    local item = redis.call('LINDEX', KEYS[i], -1)
    if not item then break end
    local recorded = 0
    local ok, msg = pcall(cjson.decode, item)
    if ok and type(msg) == 'table' and type(msg.properties) == 'table' then
      local tag = msg.properties.delivery_tag
      local info = msg.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('HSET', KEYS[1], tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange) .. ','
          .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        if holder ~= '' then
          redis.call('HSET', KEYS[4], tag, holder)
          redis.call('HSET', KEYS[5], tag, #item .. '\n' .. KEYS[i] .. '\n' .. KEYS[3])
        end
        recorded = 1
      end
    end
    redis.call('RPOP', KEYS[i])
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
    out[#out + 1] = recorded
    taken = taken + 1
  end
end
if holder ~= '' and taken > 0 then
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
end
for i = 6, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then
    out[1] = 1
    return out
  end
end
redis.call('DEL', KEYS[3])
return out
