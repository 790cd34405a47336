-- Ring a route's doorbell (see pipeq.core.publish): give KEYS[1] one item unless it has one.
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('LPUSH', KEYS[1], '1') end
