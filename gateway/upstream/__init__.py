"""The model servers behind the gateway: pools and balancing with outlier ejection, health checks,
the upstream HTTP client (httptools) and the caller JWT sent upstream.
May import: config, errors. Nothing here knows about keys, limits or usage."""
