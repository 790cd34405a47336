-- Claim the oldest messages of a route's queues (see pipeq.worker.broker.claiming).
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] the queues' doorbell
-- (pipeq.core.publish), KEYS[4] the holders' owner hash (delivery tag -> holder), KEYS[5]
-- this holder's held hash (pipeq.worker.broker.handover), KEYS[6..] queue lists in the order
-- to serve.
-- ARGV[1] the claim time (the client's clock, as kombu's restore compares with it),
-- ARGV[2] the most messages to take, ARGV[3] the holder ('' : no hand-over records),
-- ARGV[4] how long the hand-over records outlive the claim (ms; renewals extend it).
-- ARGV[5] the job records' key prefix ('' : start nothing), ARGV[6] the route's task name,
-- ARGV[7] the records' ttl (s), ARGV[8] the worker the start is recorded for.
-- Returns {more, key, item, recorded, started, key, item, recorded, started, ...}: more is 1
-- while a queue still holds a message. Leaving every queue empty, the claim silences the doorbell: waiting
-- workers then block. Each unacked entry is built from the item's own bytes
-- ('[' item ',' EX ',' RK ']'), so it is byte-for-byte the message kombu would restore. An
-- item that is not a kombu message is returned unrecorded: the transport dead-letters it and
-- nothing would ever restore it.
-- With a holder, the same step records who holds the message and where it came from (its
-- length inside the unacked entry, its queue and its doorbell, one per line: keys hold no
-- newline), so that live workers can put it back, byte for byte, once the holder's lease
-- expires (lua/lease.lua).
-- With a record prefix (an idle worker's claim), a claim that takes exactly one of the route's
-- job messages also marks that job STARTED, as pipeq.core.store's job_start.lua does, and
-- says how in its started field ('<state before>:<starts>'; '' when it did not): the worker
-- runs such a job at once, and its start then costs no round trip of its own. A message
-- without the pipeq_deadline header (not written by pipeq's publisher), or whose deadline
-- has passed, is left to the worker's own start: an expired job's record is never touched.
local final = {SUCCESS = true, FAILURE = true, CANCELLED = true, EXPIRED = true}

local function start_lone(msg)
  local headers = msg.headers
  if type(headers) ~= 'table' or headers.task ~= ARGV[6] then return '' end
  local id = headers.id
  if type(id) ~= 'string' or #id == 0 or #id > 128 then return '' end
  local deadline = headers.pipeq_deadline
  if deadline ~= cjson.null
      and (type(deadline) ~= 'number' or deadline < tonumber(ARGV[1])) then
    return ''
  end
  local key = ARGV[5] .. id
  local state = redis.call('HGET', key, 'state')
  if state and final[state] then return state .. ':0' end
  redis.call('HSET', key, 'state', 'STARTED', 'worker', ARGV[8], 'started_at', ARGV[1])
  local starts = redis.call('HINCRBY', key, 'starts', 1)
  redis.call('EXPIRE', key, ARGV[7])
  return (state or 'PENDING') .. ':' .. starts
end

local out = {0}
local lone = nil
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
    lone = nil
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
        lone = msg
      end
    end
    redis.call('RPOP', KEYS[i])
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
    out[#out + 1] = recorded
    out[#out + 1] = ''
    taken = taken + 1
  end
end
if taken == 1 and lone and (ARGV[5] or '') ~= '' then
  out[5] = start_lone(lone)
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
