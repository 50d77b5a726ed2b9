"""The shared store: Redis key names, the client seam (redis-py, or fakeredis embedded), the lean
pipelined RESP client of the request path, topologies (Cluster, Sentinel) and the Lua scripts.
May import: nothing else of the gateway."""
