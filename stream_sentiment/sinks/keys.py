"""Every Redis key the service writes, in one place (documented in docs/redis-schema.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """Every Redis key the service writes, in one place (documented in docs/redis-schema.md)."""

    prefix: str

    @property
    def totals(self) -> str:
        return f"{self.prefix}:totals"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead_lettered"

    def bucket(self, dimension: str, value: str, start: int) -> str:
        return f"{self.prefix}:agg:{dimension}:{value}:{start}"

    def offsets(self, topic: str) -> str:
        """Hash partition -> the next offset to apply (the applied high-water mark)."""
        return f"{self.prefix}:offsets:{topic}"

    def offset_regressions(self, topic: str) -> str:
        """Hash partition -> times its log was found to restart below the applied mark."""
        return f"{self.prefix}:offset-regressions:{topic}"

    def owners(self, topic: str) -> str:
        """Hash partition -> the token of the member that claimed it last; other members' writes are refused."""
        return f"{self.prefix}:owners:{topic}"

    @property
    def first_bucket(self) -> str:
        """Start of the earliest bucket with an on-time post: windows reaching before it are incomplete."""
        return f"{self.prefix}:first-bucket"

    def stream_times(self, topic: str) -> str:
        """Hash partition -> stream time (highest event time applied), moved with the offset mark."""
        return f"{self.prefix}:stream-time:{topic}"

    def idle_partitions(self, topic: str) -> str:
        """Hash partition -> 1 for partitions their owner found idle; cleared by the partition's next range."""
        return f"{self.prefix}:idle:{topic}"

    def samples(self, dimension: str, value: str, start: int) -> str:
        """Sorted set of the bucket's most negative posts (JSON ``{"id", "text"}``, score P(negative))."""
        return f"{self.prefix}:samples:{dimension}:{value}:{start}"

    def dimension_values(self, start: int) -> str:
        """Set of ``dimension:value`` members that have a bucket starting at ``start``."""
        return f"{self.prefix}:dims:{start}"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}:alerts"

    @property
    def alerts_judged(self) -> str:
        """The end of the last window judged (every window length ending there was judged at once)."""
        return f"{self.prefix}:alerts:judged-until"

    @property
    def alert_baselines(self) -> str:
        return f"{self.prefix}:alerts:baselines"

    @property
    def alert_last_active(self) -> str:
        return f"{self.prefix}:alerts:last-active"
