"""The model-server simulator (`liutong-gateway sim-upstream`): one simulated continuous-batching
LLM engine per process, behind the same Chat Completions API as the mock upstream, so that routing
and queueing decisions in the gateway have the consequences they have on real servers.

What it simulates: a prompt's tokens and 16-token KV blocks exactly as `gateway.upstream.blocks`
defines them (so the gateway's router and the server agree on block ids); a KV cache of
`--kv-blocks` blocks with prefix caching and LRU eviction of blocks no running request holds
(`kvcache`); at most `--max-num-seqs` running requests, the rest waiting first come first served,
and engine steps that each prefill up to `--max-batched-tokens` uncached prompt tokens and decode
one token for every running request, timed `step_base + per_prefill_token × prefill tokens +
per_seq × running` (`engine`), with defaults calibrated to a published vLLM run of Llama-3.1-8B on
one H100 (`calibration`); vLLM's metric names on `/metrics` (`metrics`); `--time-scale` dividing
every duration. What it does not: attention cost growing with context length, preemption and
recomputation (a request that does not fit in the cache waits instead), speculative decoding,
sampling, real tokenizers, several choices decoding as separate sequences (n > 1 decodes as one).

Modules: `calibration` (the engine's settings and their source), `kvcache`, `engine`, `metrics`,
`server` (HTTP and the command). May import: `gateway.upstream.blocks` and `gateway.mock`
(request parsing and the deterministic text), nothing else of the gateway.
"""
