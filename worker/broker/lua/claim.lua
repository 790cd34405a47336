-- Claim the oldest message of a route's queues (see pipeq.worker.broker.claiming).
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] the queues' doorbell
-- (pipeq.core.publish), KEYS[4..] queue lists in the order to serve.
-- ARGV[1] the claim time (the client's clock, as kombu's restore compares with it).
-- Leaving every queue empty, the claim silences the doorbell: waiting workers then block.
-- The unacked entry is built from the item's own bytes ('[' item ',' EX ',' RK ']'), so it
-- is byte-for-byte the message kombu would restore. An item that is not a kombu message is
-- returned unrecorded: the transport dead-letters it and nothing would ever restore it.
local taken = false
local recorded = 0
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
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
        recorded = 1
      end
    end
    taken = {KEYS[i], item, recorded}
    break
  end
end
for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return taken end
end
redis.call('DEL', KEYS[3])
return taken
