-- Undo starts that a worker recorded for jobs it hands back unrun (see pipeq.core.store).
-- KEYS: job record keys. ARGV[1] the worker, then per job its state before the start.
-- Only a record still STARTED by this worker changes: its start count goes down by one, and
-- a job that was PENDING is PENDING again (with no worker). One that moved on (final, or
-- started again by another worker after a hand-over) is left as it is.
for i, key in ipairs(KEYS) do
  local state, worker = unpack(redis.call('HMGET', key, 'state', 'worker'))
  if state == 'STARTED' and worker == ARGV[1] then
    if redis.call('HINCRBY', key, 'starts', -1) <= 0 then
      redis.call('HDEL', key, 'starts')
    end
    if ARGV[i + 1] == 'PENDING' then
      redis.call('HSET', key, 'state', 'PENDING')
      redis.call('HDEL', key, 'worker', 'started_at')
    end
  end
end
return 1
