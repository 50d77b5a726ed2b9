-- Append one usage record to the stream exactly once, and count it in the hourly and daily
-- aggregates in the same step, so that records and aggregates always agree.
--
-- KEYS[1] the idempotence marker of this record (named by its record id, which every retry
-- and spool replay of the write carries), KEYS[2] the usage stream, KEYS[3] the set of the
-- keys and orgs with usage on the record's day, KEYS[4..] aggregate hashes (per key and per
-- org, per hour and per day).
-- ARGV[1] marker TTL in seconds, ARGV[2] stream max length (approximate, 0 = unbounded),
-- ARGV[3] prompt tokens, ARGV[4] completion tokens, ARGV[5] 1 if the request failed,
-- ARGV[6] the writer's id (kept in the marker), ARGV[7] n, ARGV[8..7+n] members of the day's
-- set (`key:<key_id>`, `org:<org>`), then the record as field, value pairs (its `cost_micros`
-- and `price_id` are read from them: `cost_micros` and `unpriced` in the aggregates).
-- Reply: 1 if written now; 2 if this writer had written it before (a retry after a lost
-- reply); 0 if another writer had.
if not redis.call('SET', KEYS[1], ARGV[6], 'NX', 'EX', tonumber(ARGV[1])) then
  if redis.call('GET', KEYS[1]) == ARGV[6] then
    return 2
  end
  return 0
end
local n = tonumber(ARGV[7])
local fields = {}
for i = 8 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
for i = 8, 7 + n do
  redis.call('SADD', KEYS[3], ARGV[i])
end
-- Spend: the record's own `cost_micros` and `price_id` (an empty `price_id`: a model without a price).
local cost, unpriced = 0, 0
for i = 1, #fields - 1, 2 do
  if fields[i] == 'cost_micros' then cost = tonumber(fields[i + 1]) or 0 end
  if fields[i] == 'price_id' and fields[i + 1] == '' then unpriced = 1 end
end
for i = 4, #KEYS do
  if cost > 0 then redis.call('HINCRBY', KEYS[i], 'cost_micros', cost) end
  if unpriced > 0 then redis.call('HINCRBY', KEYS[i], 'unpriced', 1) end
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  redis.call('HINCRBY', KEYS[i], 'prompt_tokens', tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[i], 'completion_tokens', tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[i], 'errors', tonumber(ARGV[5]))
end
return 1
