"""Process-wide interpreter settings for the serving processes (worker, engine server).

Two things CPython does by default cost a streaming worker its tail latency:

* **The GIL hand-over interval.** A thread waiting for the GIL gets it only every 5 ms while the
  holder runs Python. A busy worker's event loop runs Python most of the time, so each engine
  completion and tokenizer batch waited up to 5 ms for the GIL, and so did the engine server's
  threads: on the H200 host a 2 ms engine call took 4-10 ms as seen by the worker. 0.5 ms bounds
  that wait for a few more switches.
* **The cyclic garbage collector.** A full collection walks every tracked container object in the
  process with the GIL held. What a serving process loads at start-up (modules, the tokenizer, the
  engine, for the engine server all of torch) never becomes garbage, yet every full collection
  walks it again: pauses of a worker's event loop of up to ~50 ms on the H200 host at 50,000 posts/s
  (some 650-800 collections across 8 workers in 6 s), 100-200 ms on the 2-core VM. And with
  the default young-generation threshold (700 allocations: a few dozen posts) every post still in
  flight is seen by several young collections and promoted, so full collections keep coming.
  :func:`settle_heap` moves everything alive after start-up into the collector's permanent
  generation (``gc.freeze``), and :func:`tune_interpreter` collects the young generation every
  10,000 allocations instead, so posts mostly finish (and are freed by reference counting) before
  a collection sees them.

Objects frozen are never collected, even when they later become cyclic garbage, so whatever
releases something loaded earlier (an engine retired by a hot swap) calls :func:`settle_heap`
again: one full collection of the whole heap, then a new freeze. That one pause per release (a full
collection of a worker's heap took 30-110 ms on the 2-core VM) is the price of the freeze.
"""

from __future__ import annotations

import gc
import sys

GIL_SWITCH_INTERVAL_S = 0.0005
GC_YOUNG_THRESHOLD = 10_000
PYTHON_GC_YOUNG_THRESHOLD = 700  # CPython's default

_heap_settling = False


def tune_interpreter(*, settle_heap_after_start: bool = True) -> None:
    """Set the GIL switch interval and the collector's thresholds for this process.

    Args:
        settle_heap_after_start: also tune the garbage collector and let :func:`settle_heap` freeze the
            start-up heap (off: CPython's collector as it comes, for comparison in benchmarks).
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    use_settled_collector(settle_heap_after_start)


def use_settled_collector(enabled: bool) -> None:
    """Heap settling on (young collections every 10,000 allocations, :func:`settle_heap` freezes) or off
    (CPython's collector as it comes: nothing frozen, every 700 allocations)."""
    global _heap_settling
    _heap_settling = enabled
    _, middle, old = gc.get_threshold()
    if enabled:
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    else:
        gc.unfreeze()
        gc.set_threshold(PYTHON_GC_YOUNG_THRESHOLD, middle, old)


def settle_heap() -> None:
    """Collect once, then freeze what is left alive: after start-up (engine loaded and warm), and again
    after an engine is released, so a full collection can free it.

    A no-op unless :func:`tune_interpreter` enabled it, so library code and tests may call it freely.
    """
    if not _heap_settling:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()
