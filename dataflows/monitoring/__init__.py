"""Serving stats and drift: windows per shard and per data type, reference profiles."""
