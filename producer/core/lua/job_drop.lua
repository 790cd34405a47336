-- Drop the data (result or error) of final job records whose callers have read them; the
-- state stays until the record expires, so a re-delivered message is still not run again
-- and a second read says the result was dropped (see pipeq.core.store.JobStore.drop).
-- KEYS: job record keys. ARGV[1] the data that marks a dropped record.
-- Returns per job 1 when its data was dropped, 0 when the record is not final (or gone).
local final = {SUCCESS = true, FAILURE = true, CANCELLED = true, EXPIRED = true}
local out = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, 'state')
  if state and final[state] then
    redis.call('HSET', key, 'data', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
