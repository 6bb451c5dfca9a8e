"""Sinks: Redis aggregates, alerts and the exactly-once offset fence."""
