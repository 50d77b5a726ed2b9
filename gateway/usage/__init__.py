"""Usage records (CONTRACT §8): the record itself, the writer that settles requests in the store,
the local spool that keeps records while the store is down, and export and summary for the CLI.
May import: store, config."""
