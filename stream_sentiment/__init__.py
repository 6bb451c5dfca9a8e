"""stream-sentiment: a streaming pipeline that watches posts for negative-sentiment surges."""

__version__ = "0.1.0"
