-- Append one usage record to the stream exactly once per request id, and count it in the
-- hourly and daily aggregates in the same step, so that records and aggregates always agree.
--
-- KEYS[1] the idempotence marker for this request id, KEYS[2] the usage stream,
-- KEYS[3..] aggregate hashes (per key and per org, per hour and per day).
-- ARGV[1] marker TTL in seconds, ARGV[2] stream max length (approximate, 0 = unbounded),
-- ARGV[3] prompt tokens, ARGV[4] completion tokens, ARGV[5] 1 if the request failed,
-- ARGV[6..] the record as field, value pairs.
-- Reply: 1 if written now, 0 if this request id had been written before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  redis.call('HINCRBY', KEYS[i], 'prompt_tokens', tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[i], 'completion_tokens', tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[i], 'errors', tonumber(ARGV[5]))
end
return 1
