-- wrk script: POST one small chat completion with a bearer key, then print a JSON summary.
--
--   WRK_KEY=lt_... WRK_MODEL=bench-json wrk -t1 -c64 -d10s -s bench/wrk/post.lua http://127.0.0.1:P/v1/chat/completions
--
-- WRK_KEY (optional) becomes `Authorization: Bearer …`; WRK_MODEL names the model (default
-- bench-json). The body is the same bytes for every request. `done` prints one line that starts
-- with BENCH_JSON: counts, errors (wrk counts statuses ≥ 400 as status errors) and latency
-- percentiles in microseconds.

local key = os.getenv("WRK_KEY") or ""
local model = os.getenv("WRK_MODEL") or "bench-json"

wrk.method = "POST"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are terse."},'
  .. '{"role":"user","content":"Say hello in one word."}],"max_tokens":16,"temperature":0.2}'
wrk.headers["Content-Type"] = "application/json"
if key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
