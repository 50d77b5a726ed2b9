"""The gateway's benchmark: one command measures it against a bare pass-through and the upstream.

`python -m bench` (or `bash bench/run.sh`) starts its own redis-server, nginx (the instant
non-streaming upstream), `sse_upstream.py` (the streaming one: the mock upstream's streams at a
fraction of its CPU), the minimal pass-through proxy in `passthrough.py` and the gateway with
every feature on; pins the proxy under test to core 0 and everything else to core 1; drives
them with wrk (`wrk/post.lua`), the open-loop client in `openloop.py` and the SSE client in
`sse_load.py`; profiles the gateway with py-spy; and writes the table, the machine and the
command to `BENCHMARKS.md`. Nothing here is imported by the
gateway, and nothing here runs in CI.
"""
