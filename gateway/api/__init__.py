"""The client API (CONTRACT §1): the chat completions handler and what only it uses — request
validation, forwarding with its idle deadline, the SSE relay, and settlement of each request.
May import: upstream, limits, usage, keys, store, and the top-level modules (state, errors, metrics)."""
