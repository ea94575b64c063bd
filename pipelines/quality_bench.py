"""``rgnet bench --quality``: does ``rgnet train`` (Ray Train workers) train the model ``rgnet train --local`` trains?

For each seed, the same config is trained twice in child processes: once with ``rgnet train --local`` (one process)
and once with ``rgnet train`` (``ray.num_workers`` Ray Train workers, no MLflow), both with ``train.threads`` torch
threads per training process (default 1, the same on both sides: results depend on the thread count).  The global
batch, the epochs and everything else are the same config.  The test-split metrics of each run's best checkpoint are
collected; the table gives each path's mean, standard deviation and range over the seeds, and the paired difference
(distributed - local, same seed) with a 95% t interval.  Runs whose report exists are not trained again (re-running
resumes); distributed runs run one at a time (they use every core), local runs ``--parallel`` at a time.

Writes ``OUT/quality.json`` and ``OUT/quality.md``; wall times are per run as measured here (state the load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.common import abspath
from rgnet.config import ConfigError
from rgnet.eval.stats import t_interval
from rgnet.io import atomic_write_json, atomic_write_text

METRICS = ("retrieval_R1", "retrieval_R5", "R1@0.3", "R1@0.5", "R5@0.3", "mIoU")


@dataclass(frozen=True)
class QualityOptions:
    """The seeds (``train.seed``), torch threads per training process, local runs at a time, the output folder, and
    the preset and overrides both paths train with."""

    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    parallel: int = 2
    out: str = "runs/quality"
    preset: str | None = None
    overrides: tuple[str, ...] = ()


def _run(path: str, seed: int, args: QualityOptions, out: Path) -> dict[str, Any]:
    """Train one (path, seed) in a child process unless its test report exists; returns its report and wall time."""
    name = f"{path}-seed{seed}"
    report = out / "runs" / name / "report_test.json"
    timing = out / "runs" / name / "quality_wall_s.json"
    if report.exists() and timing.exists():
        return {"report": json.loads(report.read_text()), "wall_s": json.loads(timing.read_text())["wall_s"]}
    overrides = [
        *args.overrides,
        f"train.seed={seed}",
        f"train.threads={args.threads}",
        f"train.run_name={name}",
        f"train.output_dir={out / 'runs'}",
        "train.progress=false",
    ]
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--fresh"]
    if args.preset:
        cmd += ["--preset", args.preset]
    if path == "local":
        cmd += ["--local"]
    else:
        overrides += [f"ray.storage_path={out / 'ray'}", "tracking.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([*cmd, *overrides], stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not report.exists():
        raise RuntimeError(f"{name} failed (exit {rc}); its output is in {log}")
    atomic_write_json(timing, {"wall_s": wall})
    print(f"  {name}: {wall / 60:.1f} min, test {_short(json.loads(report.read_text()))}", flush=True)
    return {"report": json.loads(report.read_text()), "wall_s": wall}


def _short(report: dict[str, Any]) -> str:
    m = report["metrics"]
    return f"retrieval_R1 {m['retrieval_R1']:.1f}  R1@0.3 {m['R1@0.3']:.1f}"


def summarise(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    import numpy as np

    table: dict[str, Any] = {}
    for metric in METRICS:
        row: dict[str, Any] = {}
        for path in ("local", "distributed"):
            values = [results[path][s]["report"]["metrics"][metric] for s in seeds]
            row[path] = {
                "values": values,
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)),
                "max": float(np.max(values)),
            }
        diffs = [
            results["distributed"][s]["report"]["metrics"][metric] - results["local"][s]["report"]["metrics"][metric]
            for s in seeds
        ]
        diff = t_interval(diffs)
        row["paired_difference"] = {"values": diffs, "mean": diff.mean, "ci95": [diff.low, diff.high]}
        table[metric] = row
    return table


def markdown(table: dict[str, Any], seeds: list[int], walls: dict[str, list[float]], threads: int) -> str:
    lines = [
        f"Test split, best checkpoint by validation; {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
        f"{threads} torch thread(s) per training process on both sides.",
        "",
        "| metric | local: mean ± std (min-max) | distributed: mean ± std (min-max) | distributed - local, paired: "
        "mean [95% CI] |",
        "|---|---|---|---|",
    ]
    for metric, row in table.items():
        loc, dist, diff = row["local"], row["distributed"], row["paired_difference"]
        lines.append(
            f"| {metric} | {loc['mean']:.1f} ± {loc['std']:.1f} ({loc['min']:.1f}-{loc['max']:.1f}) | "
            f"{dist['mean']:.1f} ± {dist['std']:.1f} ({dist['min']:.1f}-{dist['max']:.1f}) | "
            f"{diff['mean']:+.2f} [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}] |"
        )
    lines.append("")
    lines.append(
        "wall time per run: local "
        + ", ".join(f"{w / 60:.1f}" for w in walls["local"])
        + " min; distributed "
        + ", ".join(f"{w / 60:.1f}" for w in walls["distributed"])
        + " min"
    )
    return "\n".join(lines) + "\n"


def run_quality_bench(args: QualityOptions) -> dict[str, Any]:
    """Train every seed both ways (resuming), write ``quality.json`` and ``quality.md``; returns the table."""
    seeds = list(args.seeds)
    if not seeds:
        raise ConfigError("--seeds lists no seed")
    out = Path(abspath(args.out))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict[str, Any]]] = {"local": {}, "distributed": {}}
    print(f"quality benchmark in {out}: seeds {seeds}, {args.threads} thread(s) per process", flush=True)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = {s: pool.submit(_run, "local", s, args, out) for s in seeds}
        for s in seeds:
            results["local"][s] = futures[s].result()
    for s in seeds:  # one at a time: a distributed run uses every core
        results["distributed"][s] = _run("distributed", s, args, out)
    table = summarise(results, seeds)
    walls = {p: [results[p][s]["wall_s"] for s in seeds] for p in results}
    text = markdown(table, seeds, walls, args.threads)
    atomic_write_json(out / "quality.json", {"seeds": seeds, "threads": args.threads, "table": table, "walls": walls})
    atomic_write_text(out / "quality.md", text)
    print("\n" + text + f"\nwrote {out / 'quality.json'} and {out / 'quality.md'}", flush=True)
    return table
