"""Alert rules over rolling windows: negative ratio, and surge against an EWMA baseline.

Evaluated per (window, dimension, value) on the window's sums of buckets:

* **ratio** - the negative share is at least ``ratio_threshold`` over a window
  with at least ``min_posts`` posts;
* **surge** - the window's negative count is ``surge_z`` standard deviations
  above the dimension's exponentially weighted baseline. The deviation has a
  Poisson floor (sqrt of the mean, at least 1) so a quiet, flat baseline does
  not turn one extra negative post into an infinite z.

A cooldown per (rule, dimension, value) makes one incident one alert: it runs
from the last window in which the condition held, so an incident longer than
the cooldown still alerts once, and a new one alerts after ``cooldown_seconds``
of quiet. The baseline is only updated from windows without a candidate
alert, so a long incident does not become the new normal. Pure: state goes in
and comes out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AlertRules:
    ratio_threshold: float = 0.6
    min_posts: int = 50
    surge_z: float = 3.0
    ewma_alpha: float = 0.1
    cooldown_seconds: float = 300
    # Windows a baseline must have seen before surges are judged against it.
    warmup_windows: int = 5


@dataclass(frozen=True)
class WindowStats:
    window_seconds: int
    dimension: str
    value: str
    posts: int
    negative: int
    p_negative_sum: float

    @property
    def negative_ratio(self) -> float:
        return self.negative / self.posts if self.posts else 0.0


@dataclass(frozen=True)
class Baseline:
    """EWMA mean and variance of a window's negative count."""

    mean: float = 0.0
    variance: float = 0.0
    windows: int = 0

    def updated(self, observed: float, alpha: float) -> Baseline:
        if self.windows == 0:
            return Baseline(observed, 0.0, 1)
        delta = observed - self.mean
        mean = self.mean + alpha * delta
        variance = (1 - alpha) * (self.variance + alpha * delta * delta)
        return Baseline(mean, variance, self.windows + 1)

    def z_score(self, observed: float) -> float:
        spread = max(math.sqrt(self.variance), math.sqrt(max(self.mean, 0.0)), 1.0)
        return (observed - self.mean) / spread


@dataclass(frozen=True)
class Alert:
    rule: str
    stats: WindowStats
    baseline_mean: float
    z: float
    at: float

    @property
    def cooldown_key(self) -> tuple[str, str, str]:
        return (self.rule, self.stats.dimension, self.stats.value)


@dataclass
class AlertState:
    baselines: dict[tuple[int, str, str], Baseline] = field(default_factory=dict)
    # When each (rule, dimension, value) condition last held, alerted or not.
    last_active: dict[tuple[str, str, str], float] = field(default_factory=dict)


def evaluate(stats: WindowStats, state: AlertState, rules: AlertRules, now: float, *,
             partial: bool = False) -> list[Alert]:
    """Alerts this window raises (after cooldown); updates ``state`` in place.

    ``partial``: the window reaches back before the first data. Its negative *share* is still a fair
    reading, so the ratio rule applies; its *count* is short, so the surge rule does not, and the
    baseline does not learn from it.
    """
    key = (stats.window_seconds, stats.dimension, stats.value)
    baseline = state.baselines.get(key, Baseline())
    candidates = []
    warmed_up = baseline.windows >= rules.warmup_windows
    # Without a warmed-up baseline there is no meaningful z: reported as NaN.
    z = baseline.z_score(stats.negative) if warmed_up else math.nan
    if stats.posts >= rules.min_posts and stats.negative_ratio >= rules.ratio_threshold:
        candidates.append(Alert("ratio", stats, baseline.mean, z, now))
    if stats.posts >= rules.min_posts and warmed_up and not partial and z >= rules.surge_z:
        candidates.append(Alert("surge", stats, baseline.mean, z, now))
    fired = []
    for alert in candidates:
        last = state.last_active.get(alert.cooldown_key)
        if last is None or now - last >= rules.cooldown_seconds:
            fired.append(alert)
        state.last_active[alert.cooldown_key] = now
    if not candidates and not partial:  # an incident does not move the baseline
        state.baselines[key] = baseline.updated(stats.negative, rules.ewma_alpha)
    return fired
