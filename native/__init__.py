"""C for the shared-memory rings and eventfd wake-ups, bound with cffi."""
