-- Admit one request against token buckets and a concurrency lease set, atomically.
--
-- KEYS[1..n]  token buckets (hashes: `level`, `ts` in ms); KEYS[n+1] the concurrency zset.
-- ARGV[1] n, ARGV[2] request id (zset member), ARGV[3] max concurrent (0 = no limit),
-- ARGV[4] lease in ms, then per bucket: capacity, cost.
-- A bucket refills continuously at capacity per 60 s. Every bucket is checked before any is
-- debited, so a denied request costs nothing. Time is Redis server time.
--
-- Reply (integers): {verdict, culprit, retry_ms, in_flight, level_1, reset_ms_1, ..., level_n, reset_ms_n}
--   verdict 1 = admitted, 0 = denied (retry later), 2 = can never fit (cost > capacity)
--   culprit = index of the denying bucket (1..n), n+1 for the concurrency limit, 0 if admitted
--   level_i = tokens left in bucket i (after the debit when admitted), reset_ms_i = time to full.
local n = tonumber(ARGV[1])
local member = ARGV[2]
local max_concurrent = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local levels, caps, costs, rates = {}, {}, {}, {}
local verdict, culprit, retry_ms = 1, 0, 0
for i = 1, n do
  local cap = tonumber(ARGV[3 + 2 * i])
  local cost = tonumber(ARGV[4 + 2 * i])
  local rate = cap / 60000.0
  local state = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = cap
  if state[1] then
    level = math.min(cap, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  end
  levels[i], caps[i], costs[i], rates[i] = level, cap, cost, rate
  if cost > cap then
    if verdict ~= 2 then verdict, culprit, retry_ms = 2, i, 0 end
  elseif level < cost and verdict ~= 2 then
    local wait = math.ceil((cost - level) / rate)
    if verdict == 1 or wait > retry_ms then verdict, culprit, retry_ms = 0, i, wait end
  end
end

-- Every admitted request holds a lease (its member in the zset) even without a concurrency
-- limit: `finish.lua` settles a request only when it removes that member, so a settlement
-- that is retried after a lost reply is not applied twice.
local cset = KEYS[n + 1]
redis.call('ZREMRANGEBYSCORE', cset, '-inf', now)
local in_flight = redis.call('ZCARD', cset)
if max_concurrent > 0 then
  if verdict == 1 and in_flight >= max_concurrent then
    verdict, culprit = 0, n + 1
    -- The earliest lease expiry bounds the wait; 1 s when a live request holds the slot.
    retry_ms = 1000
  end
end

if verdict == 1 then
  for i = 1, n do
    levels[i] = levels[i] - costs[i]
    redis.call('HSET', KEYS[i], 'level', levels[i], 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((caps[i] - levels[i]) / rates[i]) + 1000)
  end
  redis.call('ZADD', cset, now + lease_ms, member)
  redis.call('PEXPIRE', cset, lease_ms + 1000)
  in_flight = in_flight + 1
end

local reply = {verdict, culprit, retry_ms, in_flight}
for i = 1, n do
  reply[#reply + 1] = math.floor(math.max(0, levels[i]))
  reply[#reply + 1] = math.ceil(math.max(0, caps[i] - levels[i]) / rates[i])
end
return reply
