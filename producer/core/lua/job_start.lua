-- Mark jobs STARTED unless they are final already (see pipeq.core.store).
-- KEYS: job record keys. ARGV[1] ttl (s), ARGV[2] worker hostname, ARGV[3] time.
-- Returns per job "<state before>:<starts>", where starts counts how often a worker began
-- the job (a re-delivery after a crash adds one; 0 for a final job, which is not started).
local final = {SUCCESS = true, FAILURE = true, CANCELLED = true, EXPIRED = true}
local out = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, 'state')
  if state and final[state] then
    out[i] = state .. ':0'
  else
    redis.call('HSET', key, 'state', 'STARTED', 'worker', ARGV[2], 'started_at', ARGV[3])
    local starts = redis.call('HINCRBY', key, 'starts', 1)
    redis.call('EXPIRE', key, ARGV[1])
    out[i] = (state or 'PENDING') .. ':' .. starts
  end
end
return out
