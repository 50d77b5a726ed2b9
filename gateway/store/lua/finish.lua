-- Settle one finished request: refund (or charge) token buckets and release its lease.
--
-- KEYS[1..n] token buckets, KEYS[n+1] the concurrency (lease) zset.
-- ARGV[1] n, ARGV[2] request id, then per bucket: capacity, delta (positive refunds the part
-- of the reservation that was not used, negative charges usage beyond it; a level may go
-- below zero, which is debt that later refills pay off).
-- The deltas apply only if the lease was still held, so a retried settlement is a no-op.
-- Reply: 1 if settled now, 0 if it had been settled (or its lease had expired) before.
local n = tonumber(ARGV[1])
if redis.call('ZREM', KEYS[n + 1], ARGV[2]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, n do
  local cap = tonumber(ARGV[1 + 2 * i])
  local delta = tonumber(ARGV[2 + 2 * i])
  if delta ~= 0 then
    local rate = cap / 60000.0
    local state = redis.call('HMGET', KEYS[i], 'level', 'ts')
    local level = cap
    if state[1] then
      level = math.min(cap, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
    end
    level = math.min(cap, level + delta)
    redis.call('HSET', KEYS[i], 'level', level, 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate) + 1000)
  end
end
return 1
