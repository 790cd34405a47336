-- Store final job records, never over a final one, and wake their producers
-- (see pipeq.core.store).
-- KEYS: n job record keys, then n reply lists ('' for none), then optionally the route's
-- stats hash, where each stored final state is counted once ('jobs:<STATE>').
-- ARGV[1] ttl (s), ARGV[2] the largest record data carried on the reply list (bytes), then
-- per job: state, data, job id.
-- The reply list gets the job id, followed by '\31' state '\31' data when the data is small:
-- the producer then needs no second read. Returns per job 1 when its record was stored, 0
-- when it was final already.
local final = {SUCCESS = true, FAILURE = true, CANCELLED = true, EXPIRED = true}
local n = math.floor(#KEYS / 2)
local stats = (#KEYS % 2 == 1) and KEYS[#KEYS] or nil
local ttl = ARGV[1]
local inline = tonumber(ARGV[2])
local out = {}
for i = 1, n do
  local key = KEYS[i]
  local state = redis.call('HGET', key, 'state')
  if state and final[state] then
    out[i] = 0
  else
    local base = 3 + (i - 1) * 3
    redis.call('HSET', key, 'state', ARGV[base], 'data', ARGV[base + 1])
    redis.call('EXPIRE', key, ttl)
    local reply = KEYS[n + i]
    if reply ~= '' then
      local item = ARGV[base + 2]
      if #ARGV[base + 1] <= inline then
        item = item .. '\31' .. ARGV[base] .. '\31' .. ARGV[base + 1]
      end
      -- pcall: one job's reply list (even a key of another type) never fails the others.
      redis.pcall('RPUSH', reply, item)
      redis.pcall('EXPIRE', reply, ttl)
    end
    if stats then
      redis.call('HINCRBY', stats, 'jobs:' .. ARGV[base], 1)
    end
    out[i] = 1
  end
end
return out
