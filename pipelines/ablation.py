"""The ablation table (paper Tab. 3-4) over seeds, from local runs: what ``rgnet ablate`` and ``rgnet study`` run.

Every variant of a space file with ``variants`` (default ``tune_spaces/ablations.yaml``: RGNet, each ablation and the
disjoint baseline; ``paper_tab3`` / ``paper_tab4``: the paper's cumulative tables) is trained with ``rgnet train
--local`` in a child process, once per seed (``--seeds N``: ``train.seed`` = 0 .. N-1, or ``--seed-list``), from the
same base config; each run's best checkpoint (by ``train.selection_metric`` on val) is evaluated on val and test.
Rows for the *untrained* model (the full RGNet at its seeded initialisation, no step taken, one per seed) come
first, so the table shows what training bought.

The table gives, per variant and metric, the mean over the seeds and its 95% Student t interval, and the paired
difference to the reference variant (``--reference``, default ``full``): variant minus reference *of the same seed*,
with its t interval (``rgnet.eval.stats``).  An interval that contains 0 is *undecided*: the seeds do not say which
of the two is better.  Pairing removes the spread the two share (same data order, same draws where the models
agree), so a difference can be decided while the two rows' own intervals overlap.

Threads: results depend on the torch thread count (summation order), so every run of a table uses the same
``--threads`` (default 1, set as ``train.threads`` in each run's config); ``--parallel N`` only says how many runs
go at once.  On 2 cores two one-thread runs at a time are the efficient setting (``--parallel 2``): the training
step does not scale to a second thread, and several multi-threaded torch processes on the same cores spin-wait on
each other (two two-thread steps on 2 cores took 5x as long as two one-thread ones here).

Output, in ``<train.output_dir>/<name>/`` (``--name``, default the space file's name): ``ablation.json`` (every run:
val and test metrics, epochs, wall time; the per-variant summaries and paired differences), ``ablation.md`` (the
tables the README quotes) and ``ablation.png`` (bars of the headline test metrics with their intervals).  The runs
themselves are ``<runs>/<variant>/seed<seed>/`` (what ``rgnet train --local`` writes; its log next to it as
``seed<seed>.log``), where ``<runs>`` is ``--runs-dir`` (default: the table folder): tables that share a runs folder
share the runs of identical configs (``rgnet study tab3`` and ``tab4`` share ``full``); a run folder holding another
config is an error, never overwritten.

Re-running the same command resumes per (variant, seed): a run that holds a test report for the same config is not
trained again, an interrupted one continues from its last checkpoint.  ``--fresh`` deletes this table's runs first.
Two tables trained at once over one runs folder never train the same run twice (a lock file per run).

MLflow (``--tracking``, on by default when ``tracking.enabled``): one parent run per table (``ablate-<name>``,
found again by a re-run; the table, its JSON and the plot as artifacts under ``ablation/``) and one child run per row
and seed (``<variant>-seed<seed>``, tags ``rgnet.variant`` and ``rgnet.seed``, the untrained rows included), holding
the run's config as params, its per-epoch ``train/*`` and ``val/*`` metrics under the names ``rgnet train`` logs,
``final_val/*`` and ``final_test/*`` of its best checkpoint, and its datasets: the rows sit next to training runs and
sweeps in the UI.  The runs are logged by this process after the children finish (the children train with
``--local``, without MLflow); a re-run adds nothing that is already there.

This is the local, file-based twin of ``rgnet tune --space ablations`` (Ray Tune grid, MLflow parent/child runs,
validation metrics only, one seed); use that on a cluster.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from rgnet.config import Config, ConfigError, apply_overrides, load_config, parse_override, to_yaml
from rgnet.eval.stats import Interval, paired_difference, t_interval
from rgnet.io import atomic_write_json, atomic_write_text
from rgnet.search_space import VARIANT_KEY, SearchSpace, load_space, trial_overrides

log = logging.getLogger("rgnet.ablate")

UNTRAINED = "untrained"  # the rows of the full model at initialisation
REFERENCE = "full"  # the default reference of the paired differences
TABLE_METRICS = ("retrieval_R1", "retrieval_R5", "R1@0.3", "R1@0.5", "R5@0.3", "mIoU")
PLOT_METRICS = ("retrieval_R1", "R1@0.3", "R1@0.5")
SPLITS = ("val", "test")
WALL_FILE = "ablate_wall_s.json"  # in a run folder: the wall time of the child that trained it
RESERVED = ("train.seed", "train.threads", "train.run_name")  # set per run by ablate


# ---------------------------------------------------------------------------------------------------------------
# The runs: one config per (variant, seed), trained in child processes
# ---------------------------------------------------------------------------------------------------------------
RunKey = tuple[str, int]  # (variant, seed)


def parse_seeds(seeds: int, seed_list: str | None) -> list[int]:
    """``--seed-list`` if given, else 0 .. seeds-1; duplicates are an error (a paired difference needs distinct
    seeds)."""
    if seed_list:
        try:
            out = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError as e:
            raise ConfigError(f"--seed-list must be comma-separated integers, got {seed_list!r}") from e
    else:
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        out = list(range(seeds))
    if not out:
        raise ConfigError("--seed-list names no seed")
    if len(set(out)) != len(out):
        raise ConfigError(f"--seed-list names a seed twice: {seed_list}")
    return out


def run_dir(runs: Path, variant: str, seed: int) -> Path:
    return runs / variant / f"seed{seed}"


def variant_config(
    space: SearchSpace, overrides: Sequence[str], variant: str, seed: int, threads: int, runs: Path
) -> Config:
    """One run's whole config: the space's base config <- caller's overrides <- the variant's bundle <- the run's
    seed, thread count and folder (``<runs>/<variant>/seed<seed>``)."""
    cfg = space.base_config(list(overrides))
    bundle = trial_overrides(space, {VARIANT_KEY: variant}) if variant in space.variants else []
    extra = [
        f"train.seed={seed}",
        f"train.threads={threads}",
        f"train.output_dir={runs / variant}",
        f"train.run_name=seed{seed}",
        "train.progress=false",
    ]
    return apply_overrides(cfg, [*bundle, *extra])


def plan_runs(
    space: SearchSpace,
    variants: Sequence[str],
    seeds: Sequence[int],
    threads: int,
    runs: Path,
    overrides: Sequence[str] = (),
) -> dict[RunKey, Config]:
    """The config of every (variant, seed), seed-major (all variants of the first seed first: a partial table is
    then complete for its seeds)."""
    for text in overrides:
        key, _ = parse_override(text)
        if key in RESERVED:
            raise ConfigError(
                f"rgnet ablate sets {key} per run: use --seeds/--seed-list for train.seed, --threads for "
                f"train.threads, --name/--runs-dir for the folders (got the override {text!r})"
            )
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 (the same count for every run of the table), got {threads}")
    return {(v, s): variant_config(space, overrides, v, s, threads, runs) for s in seeds for v in variants}


def _same_config(folder: Path, cfg: Config) -> bool:
    saved = folder / "config.yaml"
    return saved.exists() and load_config(config_file=saved) == cfg


def _try_lock(path: Path) -> IO[bytes] | None:
    """An exclusive, non-blocking lock on ``path`` (held until the file is closed), or None when another process
    holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "ab")  # noqa: SIM115  (closed by the caller, which holds the lock while the run trains)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def check_runs(configs: dict[RunKey, Config], runs: Path, fresh: bool) -> None:
    """Refuse run folders that hold another config (before anything is trained or deleted); ``fresh`` deletes this
    table's runs."""
    for (variant, seed), cfg in configs.items():
        folder = run_dir(runs, variant, seed)
        if folder.exists() and not fresh and not _same_config(folder, cfg):
            raise ConfigError(
                f"{folder} holds a run with another config; use --fresh to replace it, or --name/--runs-dir for "
                "a new table"
            )
    if fresh:
        for variant, seed in configs:
            shutil.rmtree(run_dir(runs, variant, seed), ignore_errors=True)


def run_variants(configs: dict[RunKey, Config], runs: Path, parallel: int, threads: int) -> dict[RunKey, float]:
    """Train each run that has no test report yet in a child ``rgnet train --local`` (``parallel`` at a time, each
    with ``threads`` torch threads); returns the wall seconds of the runs trained now.  A run another process is
    training (its lock is held) is waited for, not trained twice."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    cores = os.cpu_count() or 1
    if parallel * threads > cores:
        log.warning(
            "%d runs x %d threads on %d cores: the threads will wait on each other (slower, same results)",
            parallel,
            threads,
            cores,
        )
    pending = [key for key in configs if not (run_dir(runs, *key) / "report_test.json").exists()]
    for key in configs:
        if key not in pending:
            log.info("%s seed %d: already trained (%s), not run again", key[0], key[1], run_dir(runs, *key))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    results: dict[RunKey, float] = {}
    running: dict[RunKey, tuple[subprocess.Popen[bytes], float, IO[bytes], IO[bytes]]] = {}
    waiting_since: dict[RunKey, float] = {}
    try:
        while pending or running:
            for key in list(pending):
                if len(running) >= parallel:
                    break
                variant, seed = key
                folder = run_dir(runs, variant, seed)
                lock = _try_lock(folder.parent / f"seed{seed}.lock")
                if lock is None:  # another table is training this run: come back to it
                    if key not in waiting_since:
                        log.info("%s seed %d: being trained by another process, waiting for it", variant, seed)
                        waiting_since[key] = time.perf_counter()
                    continue
                pending.remove(key)
                if (folder / "report_test.json").exists():  # the other process finished it meanwhile
                    lock.close()
                    continue
                cfg_file = folder.parent / f"seed{seed}.yaml"
                atomic_write_text(cfg_file, to_yaml(configs[key]))
                log_file = open(folder.parent / f"seed{seed}.log", "ab")  # noqa: SIM115  (closed when it ends)
                cmd = [sys.executable, "-m", "pipelines.train", "--local", "--config", str(cfg_file)]
                log.info("%s seed %d: training (%d threads), log %s", variant, seed, threads, log_file.name)
                child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                running[key] = (child, time.perf_counter(), log_file, lock)
            time.sleep(1.0)
            for key, (child, t0, out_file, lock) in list(running.items()):
                code = child.poll()
                if code is None:
                    continue
                out_file.close()
                del running[key]
                seconds = time.perf_counter() - t0
                folder = run_dir(runs, *key)
                if code != 0 or not (folder / "report_test.json").exists():
                    lock.close()
                    raise RuntimeError(
                        f"{key[0]} seed {key[1]} failed (exit {code}); see {folder.parent / f'seed{key[1]}.log'}"
                    )
                atomic_write_json(folder / WALL_FILE, {"wall_s": seconds, "threads": threads})
                lock.close()
                results[key] = seconds
                log.info("%s seed %d: done in %.1f min", key[0], key[1], seconds / 60)
    finally:
        for child, _, out_file, lock in running.values():  # interrupted: stop the children (they resume next time)
            child.terminate()
            child.wait()
            out_file.close()
            lock.close()
    return results


def untrained_reports(cfg: Config, cache: Path) -> dict[str, Any]:
    """Val and test reports of the model of ``cfg`` at its seeded initialisation (no training step), cached in
    ``cache`` with the config they were computed for."""
    from pipelines.common import split_name
    from rgnet.data.dataset import open_split
    from rgnet.model import build_model
    from rgnet.train.loop import evaluate_model, resolve_device, seed_everything, set_threads

    if _same_config(cache, cfg) and all((cache / f"report_{s}.json").exists() for s in SPLITS):
        return {s: json.loads((cache / f"report_{s}.json").read_text()) for s in SPLITS}
    set_threads(cfg.train.threads, 1)  # the table's thread count (evaluation sums in its order too)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).to(device)
    out = {}
    for name in SPLITS:
        report, _ = evaluate_model(model, open_split(cfg.data, split_name(cfg, name)), cfg.windows, cfg.eval, device)
        out[name] = report
        atomic_write_json(cache / f"report_{name}.json", report)
    atomic_write_text(cache / "config.yaml", to_yaml(cfg))
    return out


def untrained_config(space: SearchSpace, overrides: Sequence[str], seed: int, threads: int, runs: Path) -> Config:
    """The untrained rows' model: the space's ``full`` variant (else its base config) at ``seed``."""
    cfg = variant_config(space, overrides, REFERENCE if REFERENCE in space.variants else "", seed, threads, runs)
    return apply_overrides(cfg, [f"train.output_dir={runs / UNTRAINED}"])


def prepare_runs(
    space: SearchSpace,
    variants: Sequence[str],
    seeds: Sequence[int],
    *,
    threads: int = 1,
    parallel: int = 1,
    runs: Path,
    overrides: Sequence[str] = (),
    fresh: bool = False,
) -> tuple[dict[RunKey, Config], dict[RunKey, float]]:
    """Plan and train (or find) every (variant, seed) run; returns their configs and the wall seconds of those trained
    now.  What ``rgnet study topk`` / ``oracle`` use to get the checkpoints of ``rgnet study tab3``."""
    from rgnet.data.synthetic import ensure_configured_dataset

    configs = plan_runs(space, variants, seeds, threads, runs, overrides)
    check_runs(configs, runs, fresh)
    # once, before the children start (they would race for it)
    ensure_configured_dataset(space.base_config(list(overrides)).data)
    return configs, run_variants(configs, runs, parallel, threads)


# ---------------------------------------------------------------------------------------------------------------
# The table: every run, the means over seeds with t intervals, the paired differences
# ---------------------------------------------------------------------------------------------------------------
def collect(configs: dict[RunKey, Config], untrained: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: the untrained rows first, then every (variant, seed) with its val and test metrics."""
    rows = [
        {"variant": UNTRAINED, "seed": seed, "val": rep["val"]["metrics"], "test": rep["test"]["metrics"]}
        for seed, rep in untrained.items()
    ]
    for (variant, seed), cfg in configs.items():
        folder = Path(cfg.train.output_dir) / cfg.train.run_name
        row: dict[str, Any] = {"variant": variant, "seed": seed, "run_dir": str(folder)}
        for split in SPLITS:
            row[split] = json.loads((folder / f"report_{split}.json").read_text())["metrics"]
        history = json.loads((folder / "history.json").read_text())
        row["epochs"] = len(history)
        row["best_epoch"] = int(json.loads((folder / "best_val_report.json").read_text())["epoch"])
        row["train_seconds"] = sum(float(h.get("seconds", 0.0)) for h in history)
        wall = folder / WALL_FILE
        row["wall_seconds"] = json.loads(wall.read_text())["wall_s"] if wall.exists() else None
        rows.append(row)
    return rows


def _interval_dict(values: list[float], seeds: list[int], iv: Interval) -> dict[str, Any]:
    return {"seeds": seeds, "values": values, "mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def summarise(rows: list[dict[str, Any]], order: Sequence[str], reference: str | None) -> dict[str, Any]:
    """Per variant (in ``order``), split and metric: the values over seeds, their mean and 95% t interval; per
    variant other than ``reference``: the paired difference variant - reference, matched by seed (a seed one of the
    two lacks is an error, never a silent mismatch)."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row["seed"] in by.setdefault(row["variant"], {}):
            raise ValueError(f"two rows for {row['variant']} seed {row['seed']}")
        by[row["variant"]][row["seed"]] = row
    summary: dict[str, Any] = {}
    for variant in order:
        seeds = sorted(by[variant])
        summary[variant] = {
            split: {
                m: _interval_dict(vals, seeds, t_interval(vals))
                for m in by[variant][seeds[0]][split]
                if len(vals := [by[variant][s][split][m] for s in seeds]) == len(seeds)
            }
            for split in SPLITS
        }
    differences: dict[str, Any] = {}
    if reference is not None:
        ref = by[reference]
        for variant in order:
            if variant == reference:
                continue
            seeds = sorted(by[variant])
            if seeds != sorted(ref):
                raise ValueError(
                    f"paired differences need the same seeds: {variant} has {seeds}, {reference} has {sorted(ref)}"
                )
            differences[variant] = {
                split: {
                    m: _interval_dict(
                        [by[variant][s][split][m] - ref[s][split][m] for s in seeds],
                        seeds,
                        paired_difference([by[variant][s][split][m] for s in seeds], [ref[s][split][m] for s in seeds]),
                    )
                    for m in by[variant][seeds[0]][split]
                    if m in ref[seeds[0]][split]
                }
                for split in SPLITS
            }
    return {"summary": summary, "differences": differences}


def fmt_interval(d: dict[str, Any], signed: bool = False) -> str:
    """``63.3 [55.1, 71.5]`` (one seed: the value alone)."""
    f = "{:+.1f}" if signed else "{:.1f}"
    if d["n"] < 2:
        return f.format(d["mean"])
    return f"{f.format(d['mean'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def verdict(d: dict[str, Any]) -> str:
    """higher / lower when the interval excludes 0, else undecided (one seed decides nothing)."""
    iv = Interval(d["mean"], d["low"], d["high"], d["n"])
    if not iv.decided:
        return "undecided"
    return "higher" if iv.low > 0 else "lower"


def markdown_table(
    table: dict[str, Any],
    order: Sequence[str],
    changes: dict[str, str],
    labels: dict[str, str],
    reference: str | None,
    split: str = "test",
) -> str:
    """The README tables: each row's mean [95% interval] over seeds, then the paired differences to the reference;
    a decided difference is bold, an undecided one plain."""
    summary, diffs = table["summary"], table["differences"]
    seeds = table["seeds"]
    metrics = [m for m in TABLE_METRICS if all(m in summary[v][split] for v in order)]
    head = ["variant", "paper row" if any(labels.values()) else "", "what it changes", *metrics]
    head = [h for h in head if h]
    lines = [
        f"{split} split, mean [95% t interval] over {len(seeds)} seed(s) (train.seed {', '.join(map(str, seeds))}), "
        f"{table['threads']} torch thread(s) per run:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for variant in order:
        cells = [variant, *([labels.get(variant, "")] if any(labels.values()) else []), changes.get(variant, "")]
        cells += [fmt_interval(summary[variant][split][m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if reference is not None and diffs:
        lines += [
            "",
            f"Paired difference to `{reference}` (variant - {reference}, same seed), mean [95% t interval]; **bold**: "
            "the interval excludes 0 (decided), plain: it contains 0 (undecided):",
            "",
            "| variant | " + " | ".join(metrics) + " |",
            "|" + "---|" * (len(metrics) + 1),
        ]
        for variant in order:
            if variant not in diffs:
                continue
            cells = [variant]
            for m in metrics:
                d = diffs[variant][split][m]
                text = fmt_interval(d, signed=True)
                cells.append(f"**{text}**" if verdict(d) != "undecided" else text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# MLflow: the table as a parent run, a child run per row and seed
# ---------------------------------------------------------------------------------------------------------------
def log_table(
    rows: list[dict[str, Any]],
    configs: dict[RunKey, Config],
    untrained_cfgs: dict[int, Config],
    out_dir: Path,
    space: SearchSpace,
    name: str,
    fresh: bool,
) -> str:
    """The ablation table in MLflow (module docstring); returns the parent run's UI address."""
    from mlflow.entities import Metric

    from pipelines import tracking
    from pipelines.common import split_name
    from pipelines.runtime import tracked_run
    from rgnet.config import from_dict
    from rgnet.data.dataset import open_split
    from rgnet.train.run import named_history

    any_cfg = next(iter(untrained_cfgs.values()))
    parent_cfg = from_dict({"train": {"run_name": f"ablate-{name}"}}, any_cfg)
    tags = {"rgnet.ablation": name}
    parent = tracking.open_run(
        parent_cfg, run_key=f"ablate:{out_dir}", preset=space.preset, fresh=fresh, tags=tags, command="rgnet ablate"
    )
    with tracked_run(parent):  # the parent ends FINISHED, KILLED or FAILED with this block
        splits = {c: open_split(any_cfg.data, split_name(any_cfg, c)) for c in ("train", *SPLITS)}
        inputs = {c: tracking.dataset_input(split, c) for c, split in splits.items()}  # every row trains on these
        for split in splits.values():
            split.close()
        parent.client().log_inputs(parent.run_id, datasets=list(inputs.values()))
        for file in ("ablation.md", "ablation.json", "ablation.png"):
            parent.client().log_artifact(parent.run_id, str(out_dir / file), "ablation")
        for row in rows:
            variant, seed = row["variant"], row["seed"]
            cfg = untrained_cfgs[seed] if variant == UNTRAINED else configs[(variant, seed)]
            if cfg.data != any_cfg.data:
                raise ConfigError(f"variant {variant} changes data.*: an ablation table compares models on one dataset")
            cfg = from_dict({"train": {"run_name": f"{variant}-seed{seed}"}}, cfg)
            child = tracking.open_run(
                cfg,
                run_key=f"ablate:{out_dir}/{variant}/seed{seed}",
                preset=space.preset,
                fresh=fresh,
                tags={**tags, "mlflow.parentRunId": parent.run_id, "rgnet.variant": variant, "rgnet.seed": str(seed)},
                command="rgnet ablate",
            )
            client = child.client()
            client.log_inputs(child.run_id, datasets=list(inputs.values()))
            best_epoch = 0
            if variant != UNTRAINED:
                folder = Path(row["run_dir"])
                history = json.loads((folder / "history.json").read_text())
                tracking.EpochLogger(child.uri, child.run_id, len(history)).log_history(named_history(history))
                best_epoch = int(row["best_epoch"])
                have_files = {f.path for f in client.list_artifacts(child.run_id, "reports")}
                for file in ("report_val.json", "report_test.json", "history.json"):
                    if f"reports/{file}" not in have_files:
                        client.log_artifact(child.run_id, str(folder / file), "reports")
            have = client.get_run(child.run_id).data.metrics
            ts = int(time.time() * 1000)
            final = [Metric("best_epoch", float(best_epoch), ts, best_epoch)]
            for context in SPLITS:
                ds = inputs[context].dataset
                for k, v in row[context].items():
                    key = tracking.metric_key(f"final_{context}/{k}")
                    final.append(Metric(key, float(v), ts, best_epoch, dataset_name=ds.name, dataset_digest=ds.digest))
            new = [m for m in final if have.get(m.key) != m.value]  # a re-run of the same table logs nothing again
            if new:
                client.log_batch(child.run_id, metrics=new)
            tracking.finish(child, "FINISHED")
    return tracking.run_url(parent.uri, parent.experiment_id, parent.run_id)


def _describe(bundle: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in bundle.items()) or "(none: RGNet as configured)"


def select_variants(space: SearchSpace, wanted: str | None) -> list[str]:
    order = list(space.variants)
    if not wanted:
        return order
    names = [v.strip() for v in wanted.split(",") if v.strip()]
    unknown = [v for v in names if v not in space.variants]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)} (the space has {', '.join(order)})")
    return names


@dataclasses.dataclass(frozen=True)
class AblationOptions:
    """What one ablation table is: which variants of which space, over which seeds, trained how, written where.

    ``name``: the output folder under ``train.output_dir`` (default: the space file's name); ``runs_dir``: the folder
    of the run folders (default: the table folder); ``tracking``: log to MLflow (None: ``tracking.enabled``)."""

    space: str = "ablations"
    preset: str | None = None
    variants: str | None = None
    name: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    parallel: int = 1
    reference: str | None = None
    runs_dir: str | None = None
    fresh: bool = False
    tracking: bool | None = None
    overrides: tuple[str, ...] = ()


def load_table_space(space_name: str, preset: str | None) -> SearchSpace:
    """The space file of a table (a path or a tune_spaces/ name), on ``preset`` instead of its own when given."""
    from pipelines.common import resolve_space_path

    space = load_space(resolve_space_path(space_name))
    return dataclasses.replace(space, preset=preset) if preset else space


def run_ablation(opts: AblationOptions) -> Path:
    """Train (or find) every (variant, seed) run of the table, then write ``ablation.json``, ``ablation.md`` and
    ``ablation.png`` (and log the table to MLflow); returns the table folder."""
    from rgnet.eval.plots import variant_bars

    t0 = time.perf_counter()
    space = load_table_space(opts.space, opts.preset)
    if not space.variants:
        raise ConfigError(f"{space.path} has no variants: rgnet ablate tabulates a space file's variants")
    order = select_variants(space, opts.variants)
    seeds = list(opts.seeds)
    reference = opts.reference or (REFERENCE if REFERENCE in order else order[0])
    if reference not in order:
        raise ConfigError(f"--reference {reference} is not one of the table's variants ({', '.join(order)})")
    overrides = list(opts.overrides)
    base = space.base_config(overrides)
    name = opts.name or space.path.stem
    out_dir = Path(base.train.output_dir).resolve() / name
    runs = Path(opts.runs_dir).resolve() if opts.runs_dir else out_dir
    configs, timings = prepare_runs(
        space,
        order,
        seeds,
        threads=opts.threads,
        parallel=opts.parallel,
        runs=runs,
        overrides=overrides,
        fresh=opts.fresh,
    )
    untrained_cfgs = {s: untrained_config(space, overrides, s, opts.threads, runs) for s in seeds}
    untrained = {s: untrained_reports(cfg, runs / UNTRAINED / f"seed{s}") for s, cfg in untrained_cfgs.items()}
    rows = collect(configs, untrained)
    table: dict[str, Any] = {
        "space": str(space.path),
        "overrides": overrides,
        "seeds": seeds,
        "threads": opts.threads,
        "parallel": opts.parallel,
        "reference": reference,
        "runs_dir": str(runs),
        "changes": {v: space.variants[v] for v in order},
        "labels": {v: space.labels[v] for v in order if v in space.labels},
        "rows": rows,
        **summarise(rows, [UNTRAINED, *order], reference),
        "wall_seconds": time.perf_counter() - t0,  # this invocation (a resumed table trains only what was missing)
        "trained_now": [f"{v}-seed{s}" for v, s in timings],
        "run_wall_seconds_total": sum(r["wall_seconds"] or 0.0 for r in rows if r["variant"] != UNTRAINED),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "ablation.json", table)
    changes = {v: _describe(space.variants[v]) for v in order}
    changes[UNTRAINED] = "the full model at its seeded initialisation, no training"
    text = markdown_table(table, [UNTRAINED, *order], changes, space.labels, reference)
    atomic_write_text(out_dir / "ablation.md", text)
    summary = table["summary"]
    variant_bars(
        out_dir / "ablation.png",
        {v: {m: summary[v]["test"][m]["mean"] for m in PLOT_METRICS} for v in [UNTRAINED, *order]},
        PLOT_METRICS,
        title=f"test split, {space.path.stem}: mean and 95% interval over {len(seeds)} seed(s)",
        errors={
            v: {m: (summary[v]["test"][m]["low"], summary[v]["test"][m]["high"]) for m in PLOT_METRICS}
            for v in [UNTRAINED, *order]
        },
    )
    print(text)
    print(f"table: {out_dir / 'ablation.md'}  plot: {out_dir / 'ablation.png'}")
    print(f"every run of every row: {out_dir / 'ablation.json'}")
    if base.tracking.enabled if opts.tracking is None else opts.tracking:
        from pipelines.tracking import resolve_uri, ui_command

        url = log_table(rows, configs, untrained_cfgs, out_dir, space, name, opts.fresh)
        print(f"MLflow: {ui_command(resolve_uri(base.tracking.uri))}, then {url}")
    return out_dir
