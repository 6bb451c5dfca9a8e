"""The in-process CPU sampler and the profile summary the GPU bench's PROFILE=1 relies on."""

from __future__ import annotations

import time
from pathlib import Path

from bench.profile_summary import OTHER_STAGE, roles, stacks, stage_of, stage_split, summarise
from bench.stack_sampler import StackSampler


def _burn_cpu(seconds: float) -> int:
    total, end = 0, time.process_time() + seconds
    while time.process_time() < end:
        total += sum(range(200))
    return total


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_samples_follow_cpu_time_and_read_back_as_a_worker(tmp_path: Path) -> None:
    with StackSampler(interval_s=0.002) as sampler:
        _burn_cpu(0.3)
        _sleep(0.3)  # no CPU: the profiling timer does not fire, whatever the wall time
    assert sum(sampler.stacks.values()) >= 20
    burning = sum(n for stack, n in sampler.stacks.items() if "_burn_cpu" in stack)
    sleeping = sum(n for stack, n in sampler.stacks.items() if "_sleep" in stack)
    assert burning >= 0.8 * sum(sampler.stacks.values())
    assert sleeping <= 2

    profile = tmp_path / "run.txt"
    sampler.write(profile, prefix='process 7:"role=worker 0 run"')
    assert set(roles([profile]).values()) == {"worker"}
    frames = [frame for _, stack, _ in stacks([profile]) for frame in stack]
    assert "_burn_cpu (test_profiling.py)" in frames  # line numbers dropped: one entry per function
    report = summarise([profile], "worker", "test_samples_follow_cpu_time_and_read_back_as_a_worker", 1, 5)
    burn_line = next(line for line in report.splitlines() if "_burn_cpu" in line)
    assert float(burn_line.split("%")[0]) >= 80.0


def test_inactive_sampler_counts_nothing() -> None:
    with StackSampler(interval_s=0.002, active=lambda: False) as sampler:
        _burn_cpu(0.1)
    assert not sampler.stacks


def test_a_sample_counts_in_the_stage_of_its_deepest_recognised_frame(tmp_path: Path) -> None:
    apply = ["Handle._run", "Scheduler._infer", "Worker._scored", "Worker._apply_ready", "RedisSink.apply_many",
             "Redis.execute_command"]
    assert stage_of(apply) == "apply + Redis"  # not "engine call" (its task) nor "scored bookkeeping"
    assert stage_of(["Handle._run", "Scheduler._infer", "SlotPool.score", "softmax"]) == "engine call"
    assert stage_of(["Handle._run", "Worker.run", "Worker._poll_once", "KafkaSource.fetch",
                     "AIOKafkaConsumer.getmany", "Fetcher.fetched_records"]) == "kafka fetch (aiokafka)"
    assert stage_of(["Handle._run", "BaseEventLoop.call_soon"]) == OTHER_STAGE
    profile = tmp_path / "run-worker0.txt"
    profile.write_text('process 1:"role=worker 0 run";' + ";".join(f"{n} (m.py:1)" for n in apply) + " 3\n"
                       'process 1:"role=worker 0 run";Handle._run (events.py:1);PostTokenizer.encode (t.py:2) 1\n')
    split = stage_split([profile], cpu_us_per_post=40.0)
    rows = {line[:30].strip(): line[30:].split() for line in split.splitlines()[1:]}
    assert rows["apply + Redis"] == ["75.0%", "30.0"] and rows["tokenize"] == ["25.0%", "10.0"]
