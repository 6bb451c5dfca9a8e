"""Where a bench run's processes spent their Python CPU: sampled stacks summarised per role.

Reads py-spy's raw (collapsed) format: ``py-spy record --subprocesses --gil -f raw`` where ptrace is
allowed, or the files ``bench/stack_sampler`` writes from inside the bench's workers
(``scripts/device_gpu_e2e.sh`` with ``PROFILE=1``: lent GPU hosts refuse ptrace). The bench's children
are all ``multiprocessing`` spawns with one command line, so a process's role is its label's
``role=...`` or read from its stacks (a worker runs ``Worker.run``, the engine server ``EngineServer``,
...). For each role this prints its share of the samples and, under an anchor frame, the frames below it
(inclusive, once per stack), so a reader sees, say, how much of a worker's CPU its Redis apply takes and
what inside it.

    python bench/profile_summary.py pyspy.txt [--role worker] [--depth 3] [--top 25]
    python bench/profile_summary.py pyspy.txt --role worker --under CheckpointingSink.apply_ready
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

# A process's role: the first of these frames found in its stacks (most specific first).
ROLE_MARKERS = (
    ("worker", "Worker.run"),
    ("engine-server", "EngineServer"),
    ("hf-baseline", "HfConsumer"),
    ("floor", "FloorConsumer"),
    ("producer", "ProducerProcess"),
    ("driver", "amain"),
)


def stacks(paths: Sequence[Path]) -> Iterator[tuple[str, list[str], int]]:
    """(process, frames outermost first, samples) per line of py-spy raw (collapsed) profiles."""
    for line in (line for path in paths for line in path.read_text(errors="replace").splitlines()):
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        processes = [frame for frame in frames if frame.startswith("process ")]
        process = processes[-1] if processes else "process ?"
        yield process, [short(frame) for frame in frames if not frame.startswith("process ")], int(count)


def short(frame: str) -> str:
    """``name (path/to/module.py:123)`` -> ``name (module.py)``: a function, whichever of its lines ran."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else name


def name_of(frame: str) -> str:
    return frame.split(" (", 1)[0]


def roles(paths: Sequence[Path]) -> dict[str, str]:
    """Each process's role, from the frames its stacks contain."""
    seen: dict[str, set[str]] = {}
    for process, frames, _ in stacks(paths):
        seen.setdefault(process, set()).update(name_of(frame) for frame in frames)
    found = {}
    for process, names in seen.items():
        role = "other"
        for candidate, marker in ROLE_MARKERS:
            # bench/stack_sampler's files name the role in the process label; py-spy's name the command line.
            if f"role={candidate}" in process or any(marker in name for name in names):
                role = candidate
                break
        found[process] = role
    return found


# A worker's stages, each recognised by the functions that run it (name prefixes). A sample counts in the stage
# of its *deepest* such frame: the Redis write that ends a scored batch is "apply", not "engine".
WORKER_STAGES = (
    ("kafka fetch (aiokafka)", ("Fetcher.", "AIOKafkaConnection.", "AIOKafkaClient.", "PartitionRecords.",
                                "AIOKafkaConsumer.", "GroupCoordinator.")),
    ("decode", ("KafkaSource._admit", "decode_post")),
    ("tokenize", ("Scheduler._tokenize", "PostTokenizer.", "AsciiWordPieces.")),
    ("batch", ("Scheduler.dispatch", "Scheduler._record_batch", "Batcher.", "Scheduler.submit")),
    ("engine call", ("SlotPool.", "Engine.infer", "pad_to_bucket", "Scheduler.sample_shadow", "softmax")),
    ("scored bookkeeping", ("Worker._scored",)),
    ("apply + Redis", ("Worker._apply_ready", "CheckpointingSink.", "RedisSink.", "increments_for")),
)
OTHER_STAGE = "event loop, timers, other"
# Samples whose innermost frame is the event loop's select: the main thread idle, other threads' CPU charged there.
IDLE_STAGE = "other threads (main idle)"


def stage_of(names: Sequence[str]) -> str:
    """The stage of one stack (function names, outermost first): that of its deepest recognised frame."""
    for name in reversed(names):
        for stage, prefixes in WORKER_STAGES:
            if name.startswith(prefixes):
                return stage
    return OTHER_STAGE


def stage_split(paths: Sequence[Path], cpu_us_per_post: float | None = None) -> str:
    """The workers' samples by stage (:data:`WORKER_STAGES`), as shares and, given the run's worker CPU per post,
    as microseconds per post: the bench's per-stage CPU, where its own stage timers cover decode, tokenize and
    batch only."""
    role_of = roles(paths)
    shares: Counter[str] = Counter()
    for process, frames, count in stacks(paths):
        if role_of[process] == "worker":
            names = [name_of(frame) for frame in frames]
            shares[IDLE_STAGE if names and names[-1].startswith("(idle") else stage_of(names)] += count
    total = sum(shares.values()) or 1
    lines = [f"workers' CPU by stage ({total} samples{', us per post' if cpu_us_per_post else ''}):"]
    for stage in [s for s, _ in WORKER_STAGES] + [OTHER_STAGE, IDLE_STAGE]:
        share = shares[stage] / total
        per_post = f"  {share * cpu_us_per_post:6.1f}" if cpu_us_per_post else ""
        lines.append(f"  {stage:28} {share:6.1%}{per_post}")
    return "\n".join(lines)


def summarise(paths: Sequence[Path], role: str, under: str, depth: int, top: int) -> str:
    role_of = roles(paths)
    per_role: Counter[str] = Counter()
    for process, _, count in stacks(paths):
        per_role[role_of[process]] += count
    total = sum(per_role.values())
    lines = [f"{len(paths)} file(s): {total} samples; processes per role: "
             + ", ".join(f"{r} {sum(1 for v in role_of.values() if v == r)}" for r in sorted(per_role))]
    lines += [f"  {r:14} {n / total:6.1%}" for r, n in per_role.most_common()]
    inclusive: Counter[str] = Counter()
    anchored = 0
    for process, frames, count in stacks(paths):
        if role_of[process] != role:
            continue
        names = [name_of(frame) for frame in frames]
        if under:
            if under not in names:
                continue
            start = names.index(under) + 1
        else:  # below the event loop's handle (a task's step), else the whole stack
            start = names.index("Handle._run") + 1 if "Handle._run" in names else 0
        anchored += count
        for frame in set(frames[start:start + depth]) or {"(the anchor itself)"}:
            inclusive[frame] += count
    role_samples = per_role[role] or 1
    lines.append(f"\n{role}: {anchored} samples under {under or 'each task step'} "
                 f"({anchored / role_samples:.1%} of the role's), frames up to {depth} deep, inclusive:")
    lines += [f"  {n / role_samples:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, nargs="+",
                        help="py-spy raw output (record -f raw) or bench/stack_sampler files, read as one")
    parser.add_argument("--role", default="worker", help="of " + ", ".join(r for r, _ in ROLE_MARKERS))
    parser.add_argument("--under", default="", help="only stacks through this frame name, e.g. Worker._scored")
    parser.add_argument("--depth", type=int, default=3, help="frames below the anchor to count")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--stages", action="store_true",
                        help="the workers' samples by pipeline stage instead (with --cpu-us-per-post: in us per post)")
    parser.add_argument("--cpu-us-per-post", type=float, help="the run's worker CPU per post (the bench's JSON)")
    args = parser.parse_args()
    if args.stages:
        print(stage_split(args.profile, args.cpu_us_per_post))
    else:
        print(summarise(args.profile, args.role, args.under, args.depth, args.top))


if __name__ == "__main__":
    main()
