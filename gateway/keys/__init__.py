"""API keys and orgs: their records and services (shared by the CLI and the admin API),
the invalidation events that keep every replica's cache current, and the request path's
authenticator. Kept apart from `admin` because the request path uses them.
May import: store, errors."""
