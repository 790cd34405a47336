-- Publish a job message (see pipeq.core.publish): the job's PENDING record, the message on
-- its lane's queue, and the route's doorbell rung, in one atomic step.
-- KEYS[1] the job record, KEYS[2] the lane's queue list, KEYS[3] the route's doorbell.
-- ARGV[1] the record's ttl (s), ARGV[2] the message.
-- HSETNX: a re-sent job (same id) never turns a started or final record back to PENDING.
redis.call('HSETNX', KEYS[1], 'state', 'PENDING')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
if redis.call('LLEN', KEYS[3]) == 0 then redis.call('LPUSH', KEYS[3], '1') end
return 1
