"""The admin API under `/admin/` (CONTRACT §9): routes, request-body checks, JWT verification of
admin tokens and the OpenAPI document.
May import: keys, usage, store, state, errors."""
