"""The sentiment labels the service counts by, in the order of an engine's output columns.

Redis buckets and totals have one field per label, and P(negative) is read from the first
column. An engine whose manifest lists other labels, or these in another order, is refused
when a worker starts (``worker.Worker``); training writes manifests with these.
"""

from __future__ import annotations

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
