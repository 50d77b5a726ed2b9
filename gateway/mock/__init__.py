"""The built-in mock upstream, a shipped command (`liutong-gateway mock-upstream`) rather than test
code: a deterministic Chat Completions server for demos, tests and benchmarks.
May import: nothing else of the gateway."""
