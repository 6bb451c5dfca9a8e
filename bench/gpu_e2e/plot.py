"""The bench's picture, drawn from its JSON: latency against offered load, and throughput at saturation.

Per workload, two panels: P50 (dashed) and P99 (solid) end to end against the offered rate for every
set-up (the rates it fell behind at named in the legend); and each set-up's backlog drain rate (the
throughput at saturation), with the engine alone where it ran. Reads only the JSON, so it draws any
run's file, on the GPU host or anywhere else (it needs matplotlib: ``pip install -e '.[bench]'``).

    python3 -m bench.gpu_e2e.plot docs/gpu-e2e-h200-full.json [--out picture.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The set-ups in the order they are drawn (any other name is drawn after them).
ORDER = ("ours", "ours-own", "ours-coarse", "ours-python-gc", "ours-uvloop", "dynamic-pad", "pad-to-max", "hf-b64",
         "hf-b1", "kafka-only")


@dataclass
class Curve:
    """One set-up on one workload: its rate runs, sorted by offered rate, and its drain rate."""

    label: str
    offered: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    behind: list[float] = field(default_factory=list)  # offered rates it could not keep up with
    backlog_posts_per_s: float | None = None


def curves(report: dict[str, Any], workload: str) -> dict[str, Curve]:
    """Every set-up's runs on ``workload`` (rate and matched runs together; backlog separately).

    A rate run that fell behind (saturated, or not run as it would have) has no percentiles worth drawing:
    its offered rate goes to ``behind``.
    """
    labels = {name: s.get("label", name) for name, s in report.get("setups", {}).items()}
    found: dict[str, Curve] = {}
    measured: dict[tuple[str, float], list[tuple[float, float]]] = {}  # (set-up, offered) -> [(P50, P99)] per run
    for run in report["workloads"][workload]["runs"]:
        curve = found.setdefault(run["setup"], Curve(labels.get(run["setup"], run["setup"])))
        if run["mode"] == "backlog":
            curve.backlog_posts_per_s = run["posts_per_s"]
        elif run["saturated"] or run["skipped"] or run["p99_ms"] is None:
            curve.behind.append(run["offered"])
        else:
            measured.setdefault((run["setup"], run["offered"]), []).append((run["p50_ms"], run["p99_ms"]))
    # A cell run more than once (--repeats) is drawn at its medians.
    for (setup, offered), values in measured.items():
        curve = found[setup]
        curve.offered.append(offered)
        curve.p50_ms.append(float(np.median([v[0] for v in values])))
        curve.p99_ms.append(float(np.median([v[1] for v in values])))
    for curve in found.values():
        ranked = sorted(zip(curve.offered, curve.p50_ms, curve.p99_ms, strict=True))
        curve.offered, curve.p50_ms, curve.p99_ms = (list(column) for column in zip(*ranked, strict=True)) if ranked \
            else ([], [], [])
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(ORDER))))


def title(report: dict[str, Any]) -> str:
    gpus = report.get("hardware", {}).get("gpus") or ["no GPU"]
    options = report.get("options", {})
    return (f"{str(gpus[0]).split(',')[0]}, {report.get('hardware', {}).get('cpu_count', '?')} cores; "
            f"{options.get('workers', '?')} workers; {report.get('started', '')[:10]}")


def plot(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    workloads = list(report["workloads"])
    figure, axes = plt.subplots(len(workloads), 2, figsize=(14, 6 * len(workloads)), squeeze=False,
                                gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.get_cmap("tab10")
    for row, workload in zip(axes, workloads, strict=True):
        latency, throughput = row
        data = report["workloads"][workload]
        found = curves(report, workload)
        colour = {name: colours(i % 10) for i, name in enumerate(found)}
        for name, curve in found.items():
            label = curve.label + (f" — behind at {', '.join(f'{r:,.0f}' for r in sorted(curve.behind))}/s"
                                   if curve.behind else "")
            # A set-up that kept up with no rate still gets its legend line: where it fell behind.
            latency.plot(curve.offered, curve.p99_ms, "-o", color=colour[name], label=label)
            latency.plot(curve.offered, curve.p50_ms, "--", marker=".", color=colour[name], alpha=0.7)
        latency.set(xscale="log", yscale="log", xlabel="offered posts/s", ylabel="latency, ms (append → counted)",
                    title=f"{workload} (mean {data.get('mean_tokens', '?')} tokens): P99 solid, P50 dashed")
        latency.xaxis.set_minor_formatter(NullFormatter())  # 2x10^3, 3x10^3... overlap
        latency.grid(True, which="both", alpha=0.3)
        latency.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2, frameon=False)
        bars = [(c.label, c.backlog_posts_per_s, colour[n]) for n, c in found.items() if c.backlog_posts_per_s]
        engine = data.get("engine_only")
        if engine:
            for name, each in (engine.get("forwards") or {"": engine}).items():
                label = f"(d) engine only, pre-tokenized{', ' + name if name else ''}"
                bars.append((label, each["posts_per_s"], "0.5"))
        if bars:
            names, rates, tints = zip(*bars, strict=True)
            throughput.barh(range(len(bars)), rates, color=tints)
            throughput.set_yticks(range(len(bars)), names, fontsize=8)
            throughput.invert_yaxis()
            for y, rate in enumerate(rates):
                throughput.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
        throughput.set(xscale="log", xlabel="posts/s", title="throughput at saturation (backlog drain)")
        # Under two decades matplotlib labels the minor ticks too, and they overlap.
        throughput.xaxis.set_minor_formatter(NullFormatter())
        throughput.grid(True, axis="x", which="both", alpha=0.3)
    figure.suptitle(f"bench/gpu_e2e: {title(report)}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_file(path: Path, out: Path | None = None) -> Path:
    """Draw the JSON at ``path`` to ``out`` (default: the same name with ``.png``, next to it)."""
    return plot(json.loads(Path(path).read_text()), out or Path(path).with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_e2e.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a JSON written by the bench's --json")
    parser.add_argument("--out", type=Path, help="the PNG (default: next to the JSON)")
    args = parser.parse_args(argv)
    print(plot_file(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
