-- Claim the due webhooks of the outbox for one gateway replica.
-- KEYS[1]: the outbox (sorted set: job id -> when to look next)
-- ARGV[1]: now; ARGV[2]: the lease (score until which the claim holds); ARGV[3]: how many
-- A claimed member's score becomes the lease: a replica that dies holding it lets it fall due
-- again when the lease ends, so every webhook is looked at until it is delivered or dead.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
end
return due
