"""Limits that hold across every replica: token buckets for requests and tokens, concurrency
leases, and overlapped admission, each one Lua script call on the store.
May import: store, keys (the key record), config, errors."""
