"""Side concerns that subscribe to events: Prometheus metrics and the queryable state."""
