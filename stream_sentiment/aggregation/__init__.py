"""Aggregation: per-partition progress, event-time buckets, rolling windows, alerts."""
