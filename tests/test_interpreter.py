"""Process-wide interpreter tuning, checked in a fresh interpreter (the test process keeps CPython's defaults)."""

import json
import subprocess
import sys

from stream_sentiment.interpreter import GC_YOUNG_THRESHOLD, GIL_SWITCH_INTERVAL_S

PROBE = """
import gc, json, sys
from stream_sentiment import interpreter
before = gc.get_freeze_count()
interpreter.settle_heap()  # not enabled yet: nothing happens
untouched = gc.get_freeze_count() == before and gc.get_threshold()[0] == 700
interpreter.tune_interpreter(settle_heap_after_start={enable})
loaded_at_start = [object() for _ in range(3)] + [[n] for n in range(1000)]  # lives as long as the process
interpreter.settle_heap()
frozen = gc.get_freeze_count()
interpreter.settle_heap()  # after a release: unfreeze, collect, freeze again
print(json.dumps({{"untouched": untouched, "switch": sys.getswitchinterval(), "threshold": gc.get_threshold(),
                  "frozen": frozen, "refrozen": gc.get_freeze_count()}}))
"""


def probe(enable: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(enable=enable)], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_serving_processes_freeze_the_start_up_heap_and_collect_the_young_generation_less_often():
    tuned = probe(True)
    assert tuned["untouched"]  # library code may call settle_heap() in any process: a no-op until enabled
    assert tuned["switch"] == GIL_SWITCH_INTERVAL_S
    assert tuned["threshold"][0] == GC_YOUNG_THRESHOLD
    assert tuned["frozen"] >= 1000  # at least what was "loaded at start"
    assert tuned["refrozen"] >= 1000


def test_without_heap_settling_the_collector_is_left_as_cpython_has_it():
    plain = probe(False)
    assert plain["switch"] == GIL_SWITCH_INTERVAL_S
    assert plain["threshold"][0] == 700
    assert plain["frozen"] == 0
