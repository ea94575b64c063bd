"""``rgnet study NAME`` / ``python -m pipelines.study``: one of the paper's claims, one command, with error bars.

Every study is built on the commands that already exist; none trains or evaluates in a way of its own:

=============== ==================================================================================================
``tab3``        ``rgnet ablate --space paper_tab3``: the cumulative component table (Unified -> w/o Sampler -> w/o
                Proposal Retrieval -> w/o RG-Encoder = the CONE-like disjoint baseline), N seeds per row
``tab4``        ``rgnet ablate --space paper_tab4``: the cumulative loss table (Combined -> w/o Contrastive -> w/o
                Sampling loss as well), N seeds per row; shares the ``full`` runs with ``tab3``
``topk``        Fig. 5, evaluation only: R@K at IoU m against ``eval.top_k_windows`` (1, 3, 5, 10, 20, 30) for the
                trained RGNet and the disjoint baseline of ``tab3`` (the same checkpoints, every seed), plus oracle
                grounding; each point is ``rgnet evaluate --checkpoint ... eval.top_k_windows=k``
``oracle``      oracle grounding (``eval.oracle=true``: decode the ground-truth window only) against two-stage
                inference, for both models of ``tab3``, every seed, with paired differences
``length``      Fig. 7, ``rgnet tune --space paper_length``: proposal length (``windows.length_sec``) x {RGNet,
                baseline} as a Tune grid; each trial's best checkpoint evaluated on val and test
``temperature`` ``rgnet tune --space paper_temperature``: the Gumbel temperature (0.1, 0.3, 1.0, 3.0) as a Tune grid
=============== ==================================================================================================

Folders, under ``train.output_dir`` (default ``runs/``): ``paper_<study>/`` holds the study's ``study.md`` (the
table the README quotes), ``study.png`` and ``study.json`` (every number, every run); ``paper_runs/`` holds the local
training runs of ``tab3``/``tab4`` (``<variant>/seed<seed>``), which ``topk`` and ``oracle`` evaluate (training them
first if they are missing).  Tune sweeps keep Tune's layout (``<ray.storage_path>/paper_<study>`` and
``...-trials``).

Seeds: ``--seeds N`` (or ``--seed-list``) is ``train.seed`` 0 .. N-1; default 3 for the tables and the
evaluation-only studies.  The Tune studies default to one seed (each trial is a whole distributed training run); with
``--seeds N`` the grid is crossed with ``train.seed`` (a copy of the space file with that grid key is written next to
the study and swept).  Intervals are 95% Student t intervals over seeds (``rgnet.eval.stats``); differences between
models are paired by seed; an interval that contains 0 is reported as undecided.

Re-running a study resumes: ablate resumes per (variant, seed), Tune restores the sweep, and evaluations are cached
in the study folder with the checkpoint they came from (a retrained checkpoint is evaluated again).  ``--fresh``
starts a table's runs or a sweep over; for ``topk`` and ``oracle`` it only evaluates again (it never deletes the
runs of ``tab3``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines import ablation
from pipelines.common import run_command
from rgnet.config import Config, ConfigError, load_config
from rgnet.eval.stats import paired_difference, t_interval
from rgnet.io import atomic_write_json, atomic_write_text

log = logging.getLogger("rgnet.study")

STUDIES = ("tab3", "tab4", "topk", "oracle", "length", "temperature")
RUNS_FOLDER = "paper_runs"  # the local training runs the table and evaluation studies share
TOPK_KS = (1, 3, 5, 10, 20, 30)
RGNET, BASELINE = "full", "disjoint_baseline"  # the two models of paper_tab3.yaml the evaluation studies compare
MODEL_NAMES = {RGNET: "RGNet", BASELINE: "baseline"}
GROUNDING = ("R1@0.3", "R1@0.5", "R5@0.3", "mIoU")
SWEEPS = {  # study -> (space file, swept key, axis label, log axis)
    "length": ("paper_length", "windows.length_sec", "proposal length (s)", False),
    "temperature": ("paper_temperature", "model.sampler.temperature", "Gumbel temperature", True),
}
SWEEP_METRICS = ("retrieval_R1", "R1@0.3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet study",
        description="Run one of the paper's claims as a study (built on rgnet ablate / tune / evaluate) and write its "
        "markdown table and plot, with 95% intervals over seeds.",
    )
    p.add_argument("study", choices=STUDIES, help="which study (see the module docstring or the README)")
    p.add_argument("--seeds", type=int, help="train.seed = 0 .. N-1 (default: 3; 1 for length and temperature)")
    p.add_argument("--seed-list", help="comma-separated train.seed values instead of --seeds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per local training run (default: 1)")
    p.add_argument("--parallel", type=int, default=2, help="local training runs at once (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=1, help="Tune trials at once (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="start the study's runs or sweep over")
    p.add_argument(
        "--tracking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log to MLflow (default: tracking.enabled)",
    )
    p.add_argument("--preset", help="start from this preset instead of the space file's (e.g. tiny for a smoke run)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run of the study")
    return p


@dataclass(frozen=True)
class StudyOptions:
    """One study: which, over which seeds (None: the study's default), torch threads per local run, local runs and
    Tune trials at once, start over, MLflow on or off (None: ``tracking.enabled``), preset and config overrides."""

    study: str
    seeds: tuple[int, ...] | None = None
    threads: int = 1
    parallel: int = 2
    concurrency: int = 1
    fresh: bool = False
    tracking: bool | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------
def _interval(values: list[float], seeds: list[int]) -> dict[str, Any]:
    iv = t_interval(values)
    return {"seeds": seeds, "values": values, "mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def _paired(a: list[float], b: list[float], seeds: list[int]) -> dict[str, Any]:
    iv = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return {"seeds": seeds, "values": diffs, "mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def _diff_cell(d: dict[str, Any]) -> str:
    text = ablation.fmt_interval(d, signed=True)
    return f"**{text}**" if ablation.verdict(d) != "undecided" else text


def _seeds(opts: StudyOptions, default: int) -> list[int]:
    return list(opts.seeds) if opts.seeds is not None else ablation.parse_seeds(default, None)


def _base(opts: StudyOptions, space_name: str) -> tuple[Any, Config]:
    space = ablation.load_table_space(space_name, opts.preset)
    return space, space.base_config(list(opts.overrides))


def study_dir(cfg: Config, study: str) -> Path:
    return Path(cfg.train.output_dir).resolve() / f"paper_{study}"


def runs_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir).resolve() / RUNS_FOLDER


def _tracking_on(opts: StudyOptions, cfg: Config) -> bool:
    return bool(cfg.tracking.enabled if opts.tracking is None else opts.tracking)


def attach_to_run(cfg: Config, run_key: str, files: Sequence[Path], artifact_path: str) -> str | None:
    """Log ``files`` as artifacts of the MLflow run whose ``rgnet.run_key`` tag is ``run_key`` (the parent run of
    an ablate table or a Tune sweep); returns its run id, or None (with a warning) when there is no such run."""
    from mlflow import MlflowClient

    from pipelines.tracking import RUN_KEY_TAG, probe, resolve_uri

    uri = resolve_uri(cfg.tracking.uri)
    probe(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    escaped = run_key.replace("'", "\\'")
    found = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp is not None
        else []
    )
    if not found:
        log.warning("no MLflow run with %s = %s: the study's files are not attached to it", RUN_KEY_TAG, run_key)
        return None
    run_id = str(found[0].info.run_id)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)
    return run_id


def _write(out: Path, text: str, data: dict[str, Any]) -> None:
    atomic_write_text(out / "study.md", text)
    atomic_write_json(out / "study.json", data)
    print(text)
    print(f"table: {out / 'study.md'}  plot: {out / 'study.png'}  every number: {out / 'study.json'}")


# ---------------------------------------------------------------------------------------------------------------
# tab3 / tab4: rgnet ablate over a cumulative space, plus the row-to-row steps
# ---------------------------------------------------------------------------------------------------------------
def step_differences(table: dict[str, Any], order: Sequence[str], split: str = "test") -> list[dict[str, Any]]:
    """For a cumulative table: each row minus the row above it, paired by seed (what removing one more component
    did), from the runs an ``ablation.json`` keeps."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for row in table["rows"]:
        by.setdefault(row["variant"], {})[row["seed"]] = row[split]
    steps = []
    for above, below in itertools.pairwise(order):
        seeds = sorted(by[below])
        if seeds != sorted(by[above]):
            raise ValueError(f"{below} and {above} were trained with different seeds: {seeds} vs {sorted(by[above])}")
        metrics = [m for m in ablation.TABLE_METRICS if m in by[below][seeds[0]] and m in by[above][seeds[0]]]
        steps.append(
            {
                "from": above,
                "to": below,
                "metrics": {
                    m: _paired([by[below][s][m] for s in seeds], [by[above][s][m] for s in seeds], seeds)
                    for m in metrics
                },
            }
        )
    return steps


def steps_markdown(steps: list[dict[str, Any]], labels: dict[str, str]) -> str:
    metrics = list(steps[0]["metrics"]) if steps else []
    lines = [
        "Step by step (each row minus the row above it, same seed), test split, mean [95% t interval]; **bold**: "
        "decided, plain: undecided:",
        "",
        "| step | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]
    for st in steps:
        name = f"{st['from']} -> {st['to']}"
        lines.append("| " + name + " | " + " | ".join(_diff_cell(st["metrics"][m]) for m in metrics) + " |")
    lines.append("")
    for st in steps:  # one sentence per step for the headline metrics
        parts = []
        for m in ("retrieval_R1", "R1@0.3"):
            if m in st["metrics"]:
                d = st["metrics"][m]
                parts.append(f"{m} {ablation.verdict(d)} ({ablation.fmt_interval(d, True)})")
        what = labels.get(st["to"], st["to"])
        lines.append(f"- {st['from']} -> {st['to']} ({what}): " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def run_table(opts: StudyOptions, study: str) -> int:
    space, base = _base(opts, f"paper_{study}")
    seeds = _seeds(opts, 3)
    out = study_dir(base, study)
    ablation.run_ablation(
        ablation.AblationOptions(
            space=f"paper_{study}",
            preset=opts.preset,
            name=out.name,
            seeds=tuple(seeds),
            threads=opts.threads,
            parallel=opts.parallel,
            runs_dir=str(runs_dir(base)),
            fresh=opts.fresh,
            tracking=opts.tracking,
            overrides=tuple(opts.overrides),
        )
    )
    table = json.loads((out / "ablation.json").read_text())
    order = list(space.variants)
    steps = step_differences(table, order)
    text = (out / "ablation.md").read_text() + "\n" + steps_markdown(steps, space.labels)
    shutil.copyfile(out / "ablation.png", out / "study.png")
    _write(out, text, {"study": study, "ablation": str(out / "ablation.json"), "steps": steps})
    if _tracking_on(opts, base):
        attach_to_run(base, f"ablate:{out}", [out / "study.md", out / "study.json"], "study")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# topk / oracle: evaluation only, on the checkpoints of tab3's RGNet and baseline
# ---------------------------------------------------------------------------------------------------------------
def evaluate_checkpoints(
    opts: StudyOptions, settings: dict[str, list[str]], out: Path
) -> tuple[dict[str, dict[int, dict[str, dict[str, Any]]]], list[int], Config]:
    """Reports of the RGNet and baseline checkpoints of ``tab3`` (trained first if missing) on the test split under
    each setting: ``{model: {seed: {setting: {"metrics", "decoded_windows"}}}}``.  Cached per (model, seed) in
    ``out/evals/`` with the checkpoint's modification time and the settings."""
    import torch

    from pipelines.common import split_name
    from rgnet.data.dataset import open_split
    from rgnet.eval.sweep import decoded_windows, evaluate_settings
    from rgnet.train.checkpoint import load_model
    from rgnet.train.loop import resolve_device, set_threads

    space, base = _base(opts, "paper_tab3")
    seeds = _seeds(opts, 3)
    configs, _ = ablation.prepare_runs(
        space,
        [RGNET, BASELINE],
        seeds,
        threads=opts.threads,
        parallel=opts.parallel,
        runs=runs_dir(base),
        overrides=list(opts.overrides),
    )  # --fresh re-evaluates (below); it never retrains tab3's runs (`rgnet study tab3 --fresh` does)
    set_threads(opts.threads, 1)  # the runs' thread count: evaluation sums in its order too
    results: dict[str, dict[int, dict[str, dict[str, Any]]]] = {RGNET: {}, BASELINE: {}}
    for (variant, seed), cfg in configs.items():
        ckpt = Path(cfg.train.output_dir) / cfg.train.run_name / "best.pt"
        cache = out / "evals" / variant / f"seed{seed}.json"
        stamp = {"checkpoint": str(ckpt), "mtime_ns": ckpt.stat().st_mtime_ns, "settings": settings}
        if cache.exists() and not opts.fresh:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                results[variant][seed] = saved["reports"]
                continue
        device = resolve_device(cfg.train.device)
        model, model_cfg = load_model(ckpt, device)
        data = open_split(model_cfg.data, split_name(model_cfg, "test"))
        log.info("%s seed %d: evaluating %s on %s", variant, seed, ", ".join(settings), data.split)
        reports = {}
        with torch.no_grad():
            for name, (report, rows) in evaluate_settings(model, data, model_cfg, settings, device).items():
                k = next((int(o.split("=")[1]) for o in settings[name] if o.startswith("eval.top_k_windows=")), None)
                oracle = any(o == "eval.oracle=true" for o in settings[name])
                reports[name] = {
                    "metrics": report["metrics"],
                    "num_queries": report["num_queries"],
                    "decoded_windows": 1.0 if oracle else decoded_windows(rows, k or model_cfg.eval.top_k_windows),
                }
        data.close()
        atomic_write_json(cache, {**stamp, "reports": reports})
        results[variant][seed] = reports
    return results, seeds, base


def _series(
    results: dict[str, dict[int, dict[str, dict[str, Any]]]], model: str, setting: str, metric: str, seeds: list[int]
) -> list[float]:
    return [float(results[model][s][setting]["metrics"][metric]) for s in seeds]


def run_topk(opts: StudyOptions) -> int:
    from rgnet.eval.plots import sweep_lines
    from rgnet.eval.sweep import ORACLE, topk_settings

    _, base = _base(opts, "paper_tab3")
    out = study_dir(base, "topk")
    settings = topk_settings(TOPK_KS, oracle=True)
    results, seeds, base = evaluate_checkpoints(opts, settings, out)
    metrics = ("R1@0.3", "R1@0.5")
    rows: list[dict[str, Any]] = []
    for name in settings:
        row: dict[str, Any] = {"setting": name, "decoded_windows": {}}
        for model in (RGNET, BASELINE):
            row["decoded_windows"][model] = sum(results[model][s][name]["decoded_windows"] for s in seeds) / len(seeds)
            for m in metrics:
                row[f"{model}/{m}"] = _interval(_series(results, model, name, m, seeds), seeds)
        for m in metrics:
            row[f"difference/{m}"] = _paired(
                _series(results, RGNET, name, m, seeds), _series(results, BASELINE, name, m, seeds), seeds
            )
        rows.append(row)
    head = ["windows decoded (k)", "mean decoded per query"]
    for m in metrics:
        head += [f"RGNet {m}", f"baseline {m}", f"RGNet - baseline {m}"]
    lines = [
        f"Test split (profile {base.eval.profile}: IoU > m), R@1 at IoU m against the number of windows decoded per "
        f"query (eval.top_k_windows, capped per video by its windows), mean [95% t interval] over {len(seeds)} "
        f"seed(s) ({', '.join(map(str, seeds))}); the checkpoints of `rgnet study tab3` (`full` and "
        "`disjoint_baseline`), evaluated only.  Differences are paired by seed; **bold**: decided.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        name = row["setting"]
        label = "oracle (the GT window only)" if name == ORACLE else name[1:]
        dec = row["decoded_windows"]
        cells = [label, f"{dec[RGNET]:.1f}"]
        for m in metrics:
            cells += [
                ablation.fmt_interval(row[f"{RGNET}/{m}"]),
                ablation.fmt_interval(row[f"{BASELINE}/{m}"]),
                _diff_cell(row[f"difference/{m}"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    ks = list(TOPK_KS)
    lines_plot = {
        f"{MODEL_NAMES[model]} {m}": [
            (row[f"{model}/{m}"]["mean"], row[f"{model}/{m}"]["low"], row[f"{model}/{m}"]["high"])
            for row in rows
            if row["setting"] != ORACLE
        ]
        for model in (RGNET, BASELINE)
        for m in metrics
    }
    sweep_lines(
        out / "study.png",
        ks,
        lines_plot,
        xlabel="windows decoded per query (eval.top_k_windows)",
        ylabel="test recall (%)",
        title=f"R@1 vs retrieved proposals (Fig. 5), {len(seeds)} seed(s), 95% intervals",
        log_x=True,
    )
    _write(out, text, {"study": "topk", "seeds": seeds, "settings": settings, "rows": rows, "runs": results})
    return 0


def run_oracle(opts: StudyOptions) -> int:
    from rgnet.eval.plots import variant_bars
    from rgnet.eval.sweep import ORACLE

    _, base = _base(opts, "paper_tab3")
    out = study_dir(base, "oracle")
    k = base.eval.top_k_windows
    two_stage = f"k{k}"
    settings = {two_stage: [f"eval.top_k_windows={k}", "eval.oracle=false"], ORACLE: ["eval.oracle=true"]}
    results, seeds, base = evaluate_checkpoints(opts, settings, out)
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for model in (RGNET, BASELINE):
        for name in settings:
            cells[f"{model}/{name}"] = {m: _interval(_series(results, model, name, m, seeds), seeds) for m in GROUNDING}
    diffs = {
        f"{MODEL_NAMES[model]}: oracle - two-stage": {
            m: _paired(_series(results, model, ORACLE, m, seeds), _series(results, model, two_stage, m, seeds), seeds)
            for m in GROUNDING
        }
        for model in (RGNET, BASELINE)
    }
    for name, title in ((two_stage, f"two-stage (top {k})"), (ORACLE, "oracle")):
        diffs[f"RGNet - baseline, {title}"] = {
            m: _paired(_series(results, RGNET, name, m, seeds), _series(results, BASELINE, name, m, seeds), seeds)
            for m in GROUNDING
        }
    lines = [
        f"Test split (profile {base.eval.profile}), two-stage inference (retrieve, decode the top {k} windows) "
        f"against oracle grounding (decode the window holding most of the ground truth only), mean [95% t interval] "
        f"over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); the checkpoints of `rgnet study tab3`.",
        "",
        "| model | inference | " + " | ".join(GROUNDING) + " |",
        "|" + "---|" * (len(GROUNDING) + 2),
    ]
    for model in (RGNET, BASELINE):
        for name, title in ((two_stage, f"two-stage, top {k}"), (ORACLE, "oracle (GT window)")):
            row = cells[f"{model}/{name}"]
            values = " | ".join(ablation.fmt_interval(row[m]) for m in GROUNDING)
            lines.append(f"| {MODEL_NAMES[model]} | {title} | {values} |")
    lines += [
        "",
        "Paired differences (same seed), mean [95% t interval]; **bold**: decided, plain: undecided:",
        "",
        "| difference | " + " | ".join(GROUNDING) + " |",
        "|" + "---|" * (len(GROUNDING) + 1),
    ]
    for name, d in diffs.items():
        lines.append(f"| {name} | " + " | ".join(_diff_cell(d[m]) for m in GROUNDING) + " |")
    text = "\n".join(lines) + "\n"
    plot = ("R1@0.3", "R1@0.5", "mIoU")
    bars = {
        f"{MODEL_NAMES[model]} {'oracle' if name == ORACLE else f'top-{k}'}": cells[f"{model}/{name}"]
        for model in (RGNET, BASELINE)
        for name in settings
    }
    variant_bars(
        out / "study.png",
        {label: {m: v[m]["mean"] for m in plot} for label, v in bars.items()},
        plot,
        title=f"oracle grounding vs two-stage, test, {len(seeds)} seed(s), 95% intervals",
        errors={label: {m: (v[m]["low"], v[m]["high"]) for m in plot} for label, v in bars.items()},
    )
    _write(out, text, {"study": "oracle", "seeds": seeds, "cells": cells, "differences": diffs, "runs": results})
    return 0


# ---------------------------------------------------------------------------------------------------------------
# length / temperature: rgnet tune over a grid space, then each trial's best checkpoint on val and test
# ---------------------------------------------------------------------------------------------------------------
def seeded_space(space_path: Path, seeds: list[int], out: Path) -> Path:
    """The space file crossed with a ``train.seed`` grid (written next to the study); one seed: ``train.seed`` is
    fixed instead, so the sweep has exactly the file's grid."""
    data = yaml.safe_load(space_path.read_text())
    if "train.seed" in (data.get("space") or {}) or "train.seed" in (data.get("fixed") or {}):
        raise ConfigError(f"{space_path} sets train.seed itself; the study sets it from --seeds")
    if len(seeds) == 1:
        data.setdefault("fixed", {})["train.seed"] = seeds[0]
    else:
        data.setdefault("space", {})["train.seed"] = {"grid": list(seeds)}
    path = out / f"{space_path.stem}.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def best_trial_checkpoint(trial_dir: Path) -> Path:
    """The best checkpoint of a trial's Ray Train run, by the rule ``rgnet train`` uses (Ray's checkpoint manager,
    ranked by the reported selection score)."""
    import ray.train

    from pipelines.train_worker import SELECTION_SCORE
    from rgnet.train.checkpoint import CHECKPOINT_FILE

    result = ray.train.Result.from_path(str(trial_dir))
    best = result.get_best_checkpoint(SELECTION_SCORE, "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"trial run {trial_dir} holds no checkpoint")
    return Path(best.path) / CHECKPOINT_FILE


def evaluate_trial(checkpoint: Path, cache: Path, threads: int) -> dict[str, Any]:
    """Val and test reports of a checkpoint, by ``rgnet evaluate --checkpoint`` (cached with the checkpoint path)."""
    from pipelines.evaluation import evaluate_checkpoint
    from rgnet.train.loop import set_threads

    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("checkpoint") == str(checkpoint):
            return dict(saved["reports"])
    set_threads(threads, 1)
    reports = {}
    for split in ablation.SPLITS:
        reports[split] = evaluate_checkpoint(
            checkpoint=str(checkpoint), split=split, overrides=["train.progress=false"]
        )
    atomic_write_json(cache, {"checkpoint": str(checkpoint), "reports": reports})
    return reports


def run_sweep_study(opts: StudyOptions, study: str) -> int:
    from pipelines.common import resolve_space_path
    from pipelines.runtime import resolve_paths
    from pipelines.sweep import SweepOptions, run_sweep
    from rgnet.eval.plots import sweep_lines
    from rgnet.search_space import VARIANT_KEY, load_space

    space_name, key, axis, log_x = SWEEPS[study]
    seeds = _seeds(opts, 1)
    space_path = resolve_space_path(space_name)
    _, base = _base(opts, space_name)
    out = study_dir(base, study)
    out.mkdir(parents=True, exist_ok=True)
    swept = seeded_space(space_path, seeds, out)
    if opts.preset:  # the copy carries the preset the study runs on
        data = yaml.safe_load(swept.read_text())
        data["preset"] = opts.preset
        atomic_write_text(swept, yaml.safe_dump(data, sort_keys=False))
    grid = load_space(swept)
    overrides = list(opts.overrides)
    if opts.tracking is not None:
        overrides.append(f"tracking.enabled={str(opts.tracking).lower()}")
    summary = run_sweep(
        SweepOptions(
            space=str(swept),
            name=out.name,
            trials=grid.num_grid_points(),
            concurrency=opts.concurrency,
            grace_period=10**6,  # no ASHA stop: every point of the grid trains all its epochs
            fresh=opts.fresh,
            overrides=tuple(overrides),
        )
    )
    if summary.get("interrupted"):
        return 130
    cfg = resolve_paths(grid.base_config(overrides))
    sweep = json.loads((Path(cfg.train.output_dir) / out.name / "sweep.json").read_text())
    trials_root = Path(cfg.ray.storage_path) / f"{out.name}-trials"
    trials = []
    for row in sweep["trials"]:
        if row["error"] or row["stopped_early"]:
            why = row["error"] or "stopped early"
            log.warning("trial %s did not finish (%s): left out of the table", row["trial_id"], why)
            continue
        ckpt = best_trial_checkpoint(trials_root / f"{out.name}-{row['trial_id']}")
        reports = evaluate_trial(ckpt, out / "trials" / f"{row['trial_id']}.json", opts.threads)
        point = row["point"]
        trials.append(
            {
                "trial_id": row["trial_id"],
                "model": point.get(VARIANT_KEY, "rgnet"),
                "x": float(point[key]),
                "seed": int(point.get("train.seed", seeds[0])),
                "checkpoint": str(ckpt),
                "best_epoch": int(reports["val"]["checkpoint_epoch"]),
                "val": reports["val"]["metrics"],
                "test": reports["test"]["metrics"],
            }
        )
    text, data = sweep_table(trials, study, key, axis, seeds)
    xs = sorted({t["x"] for t in trials})
    models = list(dict.fromkeys(t["model"] for t in trials))
    sweep_lines(
        out / "study.png",
        xs,
        {
            f"{m} {metric}": [
                (c["mean"], c["low"], c["high"]) for x in xs for c in [data["cells"][f"{m}/{x:g}"]["test"][metric]]
            ]
            for m in models
            for metric in SWEEP_METRICS
        },
        xlabel=axis,
        ylabel="test (%)",
        title=f"{study} sweep (rgnet tune), {len(seeds)} seed(s)",
        log_x=log_x,
    )
    _write(out, text, {"study": study, "key": key, "seeds": seeds, "trials": trials, **data})
    if _tracking_on(opts, cfg):
        sweep_dir = f"{cfg.ray.storage_path.rstrip('/')}/{out.name}"
        attach_to_run(cfg, f"tune:{sweep_dir}", [out / "study.md", out / "study.png", out / "study.json"], "study")
    return 0


def sweep_table(
    trials: list[dict[str, Any]], study: str, key: str, axis: str, seeds: list[int]
) -> tuple[str, dict[str, Any]]:
    """Per swept value and model: val and test metrics, mean [interval] over seeds; with two models, the paired
    difference (first model - second, same seed) on test."""
    xs = sorted({t["x"] for t in trials})
    models = list(dict.fromkeys(t["model"] for t in trials))
    cells: dict[str, Any] = {}
    for m in models:
        for x in xs:
            runs = sorted((t for t in trials if t["model"] == m and t["x"] == x), key=lambda t: t["seed"])
            got = [t["seed"] for t in runs]
            cells[f"{m}/{x:g}"] = {
                split: {metric: _interval([t[split][metric] for t in runs], got) for metric in SWEEP_METRICS}
                for split in ablation.SPLITS
            }
    diffs: dict[str, Any] = {}
    if len(models) == 2:
        a, b = models
        for x in xs:
            ra = {t["seed"]: t for t in trials if t["model"] == a and t["x"] == x}
            rb = {t["seed"]: t for t in trials if t["model"] == b and t["x"] == x}
            common = sorted(set(ra) & set(rb))
            if common:
                diffs[f"{x:g}"] = {
                    metric: _paired(
                        [ra[s]["test"][metric] for s in common], [rb[s]["test"][metric] for s in common], common
                    )
                    for metric in SWEEP_METRICS
                }
    head = [axis, *(f"{m} {split} {metric}" for m in models for split in ("val", "test") for metric in SWEEP_METRICS)]
    if diffs:
        head += [f"{models[0]} - {models[1]} test {metric}" for metric in SWEEP_METRICS]
    lines = [
        f"`{key}` swept with rgnet tune (a grid, every trial trained to the end); each trial's best checkpoint (by "
        f"val train.selection_metric) evaluated on val and test; {len(seeds)} seed(s) per point "
        f"({', '.join(map(str, seeds))})" + (", mean [95% t interval]" if len(seeds) > 1 else "") + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for x in xs:
        row = [f"{x:g}"]
        for m in models:
            for split in ("val", "test"):
                row += [ablation.fmt_interval(cells[f"{m}/{x:g}"][split][metric]) for metric in SWEEP_METRICS]
        if diffs:
            row += [_diff_cell(diffs[f"{x:g}"][metric]) for metric in SWEEP_METRICS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", {"cells": cells, "differences": diffs, "models": models, "xs": xs}


RUNNERS: dict[str, Callable[[StudyOptions], int]] = {
    "tab3": lambda o: run_table(o, "tab3"),
    "tab4": lambda o: run_table(o, "tab4"),
    "topk": run_topk,
    "oracle": run_oracle,
    "length": lambda o: run_sweep_study(o, "length"),
    "temperature": lambda o: run_sweep_study(o, "temperature"),
}


def options(args: argparse.Namespace) -> StudyOptions:
    given = args.seeds is not None or bool(args.seed_list)
    seeds = ablation.parse_seeds(args.seeds if args.seeds is not None else 1, args.seed_list) if given else None
    return StudyOptions(
        study=args.study,
        seeds=tuple(seeds) if seeds is not None else None,
        threads=args.threads,
        parallel=args.parallel,
        concurrency=args.concurrency,
        fresh=args.fresh,
        tracking=args.tracking,
        preset=args.preset,
        overrides=tuple(args.overrides),
    )


def run_study(opts: StudyOptions) -> int:
    """Run the study ``opts.study`` and write its table, plot and numbers; returns the exit code."""
    t0 = time.perf_counter()
    load_config(opts.preset, None, opts.overrides)  # a bad override fails before anything starts
    code = RUNNERS[opts.study](opts)
    if code == 0:
        print(
            f"study {opts.study}: {time.perf_counter() - t0:.0f} s wall (this invocation; a resumed study only "
            "trains what was missing)"
        )
    return code


def _main(args: argparse.Namespace) -> int:
    return run_study(options(args))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv, intermixed=True)


if __name__ == "__main__":
    sys.exit(main())
