"""``rgnet ablate`` / ``python -m pipelines.ablate``: the ablation table (paper Tab. 3-4) from local training runs.

Every variant of a space file with ``variants`` (default ``tune_spaces/ablations.yaml``: RGNet, each ablation and the
disjoint baseline) is trained with ``rgnet train --local`` in a child process, from the same base config, and its best
checkpoint (by ``train.selection_metric`` on val) is evaluated on val and test.  A row for the *untrained* RGNet
(the full model at its seeded initialisation, no step taken) comes first, so the table shows what training bought.

Output, in ``<train.output_dir>/<name>/``: one run folder per variant (what ``rgnet train --local`` writes, its log in
``<variant>.log``), ``ablation.json`` (every metric of every row, val and test, wall time), ``ablation.md`` (the table
the README quotes) and ``ablation.png`` (bars of the headline test metrics).

Re-running the same command resumes: a variant whose run already holds a test report for the same config is not
trained again, and an interrupted one continues from its last checkpoint.  ``--fresh`` starts over.  ``--parallel N``
runs N variants at once with 1/N of the CPU threads each.  On 2 cores, 2 one-thread runs finished the 8-variant grid
in 30.5 minutes where one two-thread run takes 5.0 minutes per variant (about 1.3x sooner): the training step does not
scale to the second thread.  Never run several multi-threaded torch processes on the same cores: the threads
spin-wait on each other (two two-thread training steps on 2 cores took 5x as long as two one-thread ones here).

MLflow (``--tracking``, on by default when ``tracking.enabled``): one parent run per table (``ablate-<name>``,
found again by a re-run; the table, its JSON and the plot as artifacts under ``ablation/``) and one child run per row
and seed (``<variant>-seed<seed>``, tags ``rgnet.variant`` and ``rgnet.seed``, the untrained row included), holding
the variant's config as params, its per-epoch ``train/*`` and ``val/*`` metrics under the names ``rgnet train`` logs,
``final_val/*`` and ``final_test/*`` of its best checkpoint, and its datasets: the rows sit next to training runs and
sweeps in the UI.  The runs are logged by this process after the children finish (the children train with
``--local``, without MLflow); a re-run adds nothing that is already there.

This is the local, file-based twin of ``rgnet tune --space ablations`` (Ray Tune grid, MLflow parent/child runs,
validation metrics only); use that on a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.common import run_guarded, setup_logging
from rgnet.config import Config, ConfigError, apply_overrides, load_config, to_yaml
from rgnet.io import atomic_write_json, atomic_write_text
from rgnet.search_space import VARIANT_KEY, SearchSpace, load_space, trial_overrides

log = logging.getLogger("rgnet.ablate")

UNTRAINED = "untrained"  # the row of the full model at initialisation
TABLE_METRICS = ("retrieval_R1", "retrieval_R5", "R1@0.3", "R1@0.5", "R5@0.3", "mIoU")
PLOT_METRICS = ("retrieval_R1", "R1@0.3", "R1@0.5")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet ablate",
        description="Train every variant of a space file locally (RGNet, ablations, disjoint baseline) and tabulate "
        "val and test metrics next to the untrained model.",
    )
    p.add_argument("--space", default="ablations", help="space file with variants, or a tune_spaces/ name")
    p.add_argument("--preset", help="start from this preset instead of the space file's (e.g. tiny for a smoke run)")
    p.add_argument("--variants", help="comma-separated subset of the space's variants (default: all, in file order)")
    p.add_argument("--name", help="output folder under train.output_dir (default: the space file's name)")
    p.add_argument("--parallel", type=int, default=1, help="variants trained at once (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs of this table and start over")
    p.add_argument(
        "--tracking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the table to MLflow: a parent run, a child run per variant and seed (default: tracking.enabled)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides on top of the space's base config"
    )
    return p


def variant_config(space: SearchSpace, overrides: list[str], variant: str, out_dir: Path) -> Config:
    """The variant's whole config: the space's base config <- caller's overrides <- the variant's bundle."""
    cfg = space.base_config(overrides)
    extra = [f"train.output_dir={out_dir}", f"train.run_name={variant}", "train.progress=false"]
    return apply_overrides(cfg, [*trial_overrides(space, {VARIANT_KEY: variant}), *extra])


def untrained_reports(cfg: Config) -> dict[str, Any]:
    """Val and test reports of the full model at its seeded initialisation (no training step)."""
    from pipelines.common import split_name
    from rgnet.data.dataset import open_split
    from rgnet.model import build_model
    from rgnet.train.loop import evaluate_model, resolve_device, seed_everything

    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).to(device)
    out = {}
    for name in ("val", "test"):
        report, _ = evaluate_model(model, open_split(cfg.data, split_name(cfg, name)), cfg, device)
        out[name] = report
    return out


def _same_config(run_dir: Path, cfg: Config) -> bool:
    saved = run_dir / "config.yaml"
    return saved.exists() and load_config(config_file=saved) == cfg


def run_variants(configs: dict[str, Config], out_dir: Path, parallel: int, fresh: bool) -> dict[str, float]:
    """Train each variant in a child ``rgnet train --local`` (``parallel`` at a time); returns the wall seconds of
    each variant trained now (a variant trained by an earlier call has no entry)."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    results: dict[str, float] = {}
    pending = []
    for variant, cfg in configs.items():
        run_dir = out_dir / variant
        if run_dir.exists() and not fresh and not _same_config(run_dir, cfg):
            raise ConfigError(
                f"{run_dir} holds a run with another config; use --fresh to replace it or --name for a new table"
            )
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        if (run_dir / "report_test.json").exists():
            log.info("%s: already trained (%s), not run again", variant, run_dir)
            continue
        pending.append(variant)
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                variant = pending.pop(0)
                cfg_file = out_dir / f"{variant}.yaml"
                atomic_write_text(cfg_file, to_yaml(configs[variant]))
                log_file = open(out_dir / f"{variant}.log", "ab")  # noqa: SIM115  (closed when the child ends)
                cmd = [sys.executable, "-m", "pipelines.train", "--local", "--config", str(cfg_file)]
                log.info("%s: training (%d threads), log %s", variant, threads, log_file.name)
                child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                running[variant] = (child, time.perf_counter(), log_file)
            time.sleep(1.0)
            for variant, (child, t0, log_file) in list(running.items()):
                code = child.poll()
                if code is None:
                    continue
                log_file.close()
                del running[variant]
                seconds = time.perf_counter() - t0
                if code != 0:
                    raise RuntimeError(f"variant {variant} failed (exit {code}); see {out_dir / (variant + '.log')}")
                results[variant] = seconds
                log.info("%s: done in %.1f min", variant, seconds / 60)
    finally:
        for child, _, log_file in running.values():  # interrupted: stop the children (they resume next time)
            child.terminate()
            child.wait()
            log_file.close()
    return results


def collect(order: list[str], out_dir: Path, timings: dict[str, float], untrained: dict[str, Any]) -> dict[str, Any]:
    """The untrained model's row, then every variant's val and test metrics from its run folder."""
    rows = [{"variant": UNTRAINED, "val": untrained["val"]["metrics"], "test": untrained["test"]["metrics"]}]
    for variant in order:
        run_dir = out_dir / variant
        row: dict[str, Any] = {"variant": variant, "seconds": timings.get(variant)}
        for split in ("val", "test"):
            report = json.loads((run_dir / f"report_{split}.json").read_text())
            row[split] = report["metrics"]
        history = json.loads((run_dir / "history.json").read_text())
        row["epochs"] = len(history)
        row["train_seconds"] = sum(float(h.get("seconds", 0.0)) for h in history)
        rows.append(row)
    return {"rows": rows}


def markdown_table(table: dict[str, Any], changes: dict[str, str]) -> str:
    """The README table: test metrics of each row, then val retrieval R@1 and R1@0.3."""
    head = ["variant", "what it changes", *(f"test {m}" for m in TABLE_METRICS), "val retrieval_R1", "val R1@0.3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        test, val = row["test"], row["val"]
        cells = [row["variant"], changes.get(row["variant"], "")]
        cells += [f"{test[m]:.1f}" if m in test else "" for m in TABLE_METRICS]
        cells += [f"{val.get('retrieval_R1', float('nan')):.1f}", f"{val.get('R1@0.3', float('nan')):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# MLflow: the table as a parent run, a child run per row and seed
# ---------------------------------------------------------------------------------------------------------------
# rgnet train --local keeps bare names in history.json; these are its training ones (the rest are validation metrics),
# the split rgnet.train.run.write_epoch_plots makes
TRAIN_KEYS = ("loss", "pairs_per_s", "queries_per_s", "lr", "steps", "seconds")


def epoch_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A local run's history under the metric names a distributed ``rgnet train`` run logs (``train/loss``,
    ``val/R1@0.3``, ...), so the UI compares them."""
    out = []
    for h in history:
        entry: dict[str, Any] = {"epoch": h["epoch"]}
        for k, v in h.items():
            if k != "epoch":
                entry[f"train/{k}" if k.startswith(TRAIN_KEYS) else f"val/{k}"] = v
        out.append(entry)
    return out


def log_table(
    table: dict[str, Any],
    configs: dict[str, Config],
    full: Config,
    out_dir: Path,
    space: SearchSpace,
    name: str,
    fresh: bool,
) -> str:
    """The ablation table in MLflow (module docstring); returns the parent run's UI address."""
    from mlflow.entities import Metric

    from pipelines import tracking
    from pipelines.common import split_name
    from rgnet.config import from_dict
    from rgnet.data.dataset import open_split

    parent_cfg = from_dict({"train": {"run_name": f"ablate-{name}"}}, full)
    tags = {"rgnet.ablation": name}
    parent = tracking.open_run(
        parent_cfg, run_key=f"ablate:{out_dir}", preset=space.preset, fresh=fresh, tags=tags, command="rgnet ablate"
    )
    status = "FAILED"
    try:
        splits = {c: open_split(full.data, split_name(full, c)) for c in ("train", "val", "test")}
        inputs = {c: tracking.dataset_input(split, c) for c, split in splits.items()}  # every row trains on these
        for split in splits.values():
            split.close()
        parent.client().log_inputs(parent.run_id, datasets=list(inputs.values()))
        for file in ("ablation.md", "ablation.json", "ablation.png"):
            parent.client().log_artifact(parent.run_id, str(out_dir / file), "ablation")
        for row in table["rows"]:
            variant = row["variant"]
            cfg = configs.get(variant, full)
            if cfg.data != full.data:
                raise ConfigError(f"variant {variant} changes data.*: an ablation table compares models on one dataset")
            seed = cfg.train.seed
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
            run_dir = out_dir / variant
            best_epoch = 0
            if variant != UNTRAINED:
                history = json.loads((run_dir / "history.json").read_text())
                tracking.EpochLogger(child.uri, child.run_id, len(history)).log_history(epoch_entries(history))
                best_epoch = int(json.loads((run_dir / "best_val_report.json").read_text())["epoch"])
                for file in ("report_val.json", "report_test.json", "history.json"):
                    client.log_artifact(child.run_id, str(run_dir / file), "reports")
            have = client.get_run(child.run_id).data.metrics
            ts = int(time.time() * 1000)
            final = [Metric("best_epoch", float(best_epoch), ts, best_epoch)]
            for context in ("val", "test"):
                ds = inputs[context].dataset
                for k, v in row[context].items():
                    key = tracking.metric_key(f"final_{context}/{k}")
                    final.append(Metric(key, float(v), ts, best_epoch, dataset_name=ds.name, dataset_digest=ds.digest))
            new = [m for m in final if have.get(m.key) != m.value]  # a re-run of the same table logs nothing again
            if new:
                client.log_batch(child.run_id, metrics=new)
            tracking.finish(child, "FINISHED")
        status = "FINISHED"
    finally:
        tracking.finish(parent, status)
    return tracking.run_url(parent.uri, parent.experiment_id, parent.run_id)


def _describe(bundle: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in bundle.items()) or "(none: RGNet as configured)"


def _main(args: argparse.Namespace) -> int:
    from pipelines.common import resolve_space_path
    from rgnet.data.synthetic import ensure_configured_dataset
    from rgnet.eval.plots import variant_bars

    space = load_space(resolve_space_path(args.space))
    if args.preset:
        space = dataclasses.replace(space, preset=args.preset)
    if not space.variants:
        raise ConfigError(f"{space.path} has no variants: rgnet ablate tabulates a space file's variants")
    order = list(space.variants)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in space.variants]
        if unknown:
            raise ConfigError(f"unknown variant(s) {', '.join(unknown)} (the space has {', '.join(order)})")
        order = wanted
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    base = space.base_config(list(args.overrides))
    out_dir = Path(base.train.output_dir).resolve() / (args.name or space.path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = {v: variant_config(space, list(args.overrides), v, out_dir) for v in order}
    ensure_configured_dataset(base.data)  # once, before the children start (they would otherwise race to generate it)
    t0 = time.perf_counter()
    timings = run_variants(configs, out_dir, args.parallel, args.fresh)
    full = configs.get("full") or base
    untrained = untrained_reports(full)
    table = collect(order, out_dir, timings, untrained)
    table.update(
        space=str(space.path),
        overrides=list(args.overrides),
        changes={v: space.variants[v] for v in order},
        wall_seconds=time.perf_counter() - t0,
        parallel=args.parallel,
    )
    atomic_write_json(out_dir / "ablation.json", table)
    changes = {v: _describe(space.variants[v]) for v in order}
    changes[UNTRAINED] = "the full model at its seeded initialisation, no training"
    text = markdown_table(table, changes)
    atomic_write_text(out_dir / "ablation.md", text)
    values = {row["variant"]: {m: row["test"][m] for m in PLOT_METRICS if m in row["test"]} for row in table["rows"]}
    variant_bars(out_dir / "ablation.png", values, PLOT_METRICS, title=f"test split, {space.path.stem}")
    print(text)
    print(f"table: {out_dir / 'ablation.md'}  plot: {out_dir / 'ablation.png'}")
    print(f"every metric of every row: {out_dir / 'ablation.json'}")
    if base.tracking.enabled if args.tracking is None else args.tracking:
        from pipelines.tracking import resolve_uri, ui_command

        url = log_table(table, configs, full, out_dir, space, args.name or space.path.stem, args.fresh)
        print(f"MLflow: {ui_command(resolve_uri(full.tracking.uri))}, then {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(_main, args)


if __name__ == "__main__":
    sys.exit(main())
