"""``rgnet train`` / ``python -m pipelines.train``: train RGNet and evaluate the best checkpoint.

By default training is distributed with Ray Train (``TorchTrainer``, ``ray.num_workers`` workers reading a Ray Data
shard each, see ``pipelines.data`` and ``pipelines.train_worker``) and tracked in MLflow (``pipelines.tracking``).
The driver (this module) runs, in order:

1. data: generate the synthetic dataset if asked and absent, then open every split here, so that a missing or
   malformed dataset fails with the reader's message before Ray or any worker starts;
2. tracking: probe the MLflow store (an unreachable server fails in seconds) and create the run, or reuse the run of
   an interrupted attempt with the same storage path and run name;
3. Ray: join ``ray.address`` (or the cluster of a ``ray job submit``) or start a local Ray;
4. ``TorchTrainer.fit()``: a run with the same ``RunConfig(name, storage_path)`` as an interrupted one resumes from
   its latest checkpoint (``--fresh`` deletes it and starts over); worker failures restart the worker group from
   the latest checkpoint, up to ``ray.max_failures`` times;
5. the best checkpoint (by ``train.selection_metric`` on the validation split) is evaluated on val and test, and
   logged to MLflow with the reports, the predictions and the plots; the command that opens the run is printed.

``--local`` trains in this one process (no Ray, no MLflow): checkpoints, the validation predictions of the best
epoch and the metric reports go to ``train.output_dir/train.run_name``.  Re-running the same command resumes from
the last checkpoint of that run (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.common import SetupError, abspath, add_config_args, ray_run_dir, run_guarded, setup_logging
from rgnet.config import Config, ConfigError, from_dict, load_config, save_yaml

log = logging.getLogger("rgnet.train")

SMOKE_OVERRIDES = ["train.epochs=2"]  # --smoke-test: the tiny preset (unless one is given), 2 epochs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet train",
        description="Train RGNet on a dataset (synthetic by default, generated on first use) and evaluate it. "
        "Distributed on Ray with MLflow tracking by default; --local trains in this process.",
    )
    p.add_argument("--local", action="store_true", help="train in this process only (no Ray, no MLflow)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint of this run and start over")
    p.add_argument(
        "--no-test", action="store_true", help="skip the final evaluation of the best model on the test split"
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="a one-minute run: the tiny preset (unless --preset/--config), 2 epochs, run name <name>-smoke",
    )
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (same as tracking.uri=URI): http://HOST:PORT for a server (a multi-node cluster "
        "needs one); default sqlite:///<absolute cwd>/mlflow.db",
    )
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="fine-tune: start from the weights of this checkpoint (same as train.init_from=PATH; e.g. the "
        "checkpoint.pt of rgnet import released): weights only, fresh optimizer; ignored when the run resumes from its "
        "own checkpoint (resume wins)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_config_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.init_from:
        overrides.append(f"train.init_from={json.dumps(abspath(args.init_from))}")  # absolute: workers run elsewhere
    if not args.smoke_test:
        return load_config(args.preset, args.config, overrides)
    preset = args.preset or (None if args.config else "tiny")
    cfg = load_config(preset, args.config, [*SMOKE_OVERRIDES, *overrides])
    if not any(o.startswith("train.run_name=") for o in overrides):
        cfg = from_dict({"train": {"run_name": f"{cfg.train.run_name}-smoke"}}, cfg)
    return cfg


def prepare_data(cfg: Config) -> None:
    """Generate the synthetic dataset if the config asks for it and it is absent."""
    if cfg.data.generate_if_missing:
        from rgnet.data.synthetic import ensure_dataset

        ensure_dataset(cfg.data)


def write_epoch_plots(history: list[dict[str, Any]], out_dir: Path, selection_metric: str) -> list[Path]:
    """Per-epoch curves of a local run (``loss.png``, ``val.png``); history entries hold the train losses and rates
    (``loss*``, rates, ``lr``, ``steps``, ``seconds``) and the validation metrics under their report names."""
    from rgnet.eval.plots import epoch_curves

    train_keys = ("loss", "pairs_per_s", "queries_per_s", "lr", "steps", "seconds")
    rows = []
    for h in history:
        row: dict[str, Any] = {"epoch": h["epoch"]}
        for k, v in h.items():
            if k != "epoch":
                row[f"train/{k}" if k.startswith(train_keys) else f"val/{k}"] = v
        rows.append(row)
    return epoch_curves(rows, out_dir, selection_metric) if rows else []


def run_local(cfg: Config, *, fresh: bool = False, test: bool = True) -> dict[str, Any]:
    """Train in one process; returns the final reports. Files land in ``output_dir/run_name``."""
    from rgnet.data.dataset import open_split
    from rgnet.data.samples import TrainBatches
    from rgnet.eval.metrics import format_table
    from rgnet.eval.predictions import write_predictions
    from rgnet.io import atomic_write_json
    from rgnet.model import build_model
    from rgnet.train import checkpoint as ckpt
    from rgnet.train.loop import (
        EpochResult,
        TrainState,
        evaluate_model,
        fit,
        resolve_device,
        seed_everything,
        set_threads,
    )

    t_start = time.perf_counter()
    prepare_data(cfg)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")

    train_data = open_split(cfg.data, cfg.data.train_split)
    val_data = open_split(cfg.data, cfg.data.val_split)
    device = resolve_device(cfg.train.device)
    threads = set_threads(cfg.train.threads, os.cpu_count() or 1)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).to(device)
    ckpt.init_weights_from(model, cfg)  # train.init_from (fine-tuning); a resumed run's own checkpoint replaces it
    batches = TrainBatches(train_data, cfg)
    if batches.num_batches() == 0:
        raise ValueError(
            f"{len(train_data.records)} training queries make no full batch of train.batch_size={cfg.train.batch_size}"
        )
    last = run_dir / "last.pt"
    payload = ckpt.load_checkpoint(last) if last.exists() else None
    if payload is not None:
        log.info("resuming %s from %s (epoch %d)", cfg.train.run_name, last, payload["epoch"])
    log.info(
        "training %s on %s (%d torch threads): %d train / %d val queries, %d steps per epoch of %d queries, %d epochs",
        cfg.train.run_name,
        device,
        threads,
        len(train_data.records),
        len(val_data.records),
        batches.num_batches(),
        cfg.train.batch_size,
        cfg.train.epochs,
    )

    def on_epoch_end(result: EpochResult, state: TrainState, p: dict[str, Any]) -> None:
        if result.is_best:
            ckpt.save_checkpoint(p, run_dir / "best.pt")
            assert result.val_rows is not None and result.val_report is not None
            write_predictions(run_dir / "best_val_predictions.jsonl", result.val_rows)
            atomic_write_json(run_dir / "best_val_report.json", {"epoch": result.epoch, **result.val_report})
        ckpt.save_checkpoint(p, last)  # after best.pt: a crash in between never loses the best
        atomic_write_json(run_dir / "history.json", state.history)
        t = result.train
        line = f"epoch {result.epoch}: loss {t['loss']:.4f}  {t['pairs_per_s']:.1f} pairs/s"
        if result.val_report:
            m = result.val_report["metrics"]
            shown = [k for k in ("retrieval_R1", "R1@0.3", "R1@0.5", "R5@0.3", "mIoU") if k in m]
            line += "  val " + "  ".join(f"{k} {m[k]:.2f}" for k in shown) + ("  (best)" if result.is_best else "")
        print(line, flush=True)

    t_fit = time.perf_counter()
    final = fit(
        model, cfg, batches.epoch, batches.num_batches(), val_data, device, payload=payload, on_epoch_end=on_epoch_end
    )
    fit_s = time.perf_counter() - t_fit
    write_epoch_plots(final.history, run_dir / "plots", cfg.train.selection_metric)

    best_model, _ = ckpt.load_model(run_dir / "best.pt", device)
    out: dict[str, Any] = {}
    splits = [("val", val_data)]
    if test and cfg.data.test_split and cfg.data.test_split != cfg.data.val_split:
        splits.append(("test", open_split(cfg.data, cfg.data.test_split)))
    for name, data in splits:
        report, rows = evaluate_model(best_model.to(device), data, cfg, device)
        atomic_write_json(run_dir / f"report_{name}.json", report)
        write_predictions(run_dir / f"predictions_{name}.jsonl", rows)
        print(f"\n{name} split ({data.split}), best checkpoint:\n{format_table(report)}")
        out[name] = report
    print(f"\nrun folder: {run_dir}\n  evaluate again: rgnet evaluate --checkpoint {run_dir / 'best.pt'} --split val")
    history = [{f"train/{k}": v for k, v in h.items()} for h in final.history]
    final_s = time.perf_counter() - t_fit - fit_s
    out["time"] = time_split(history, 0.0, fit_s, final_s, time.perf_counter() - t_start)
    print(format_time_split(out["time"], local=True), flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Distributed: Ray Data + Ray Train + MLflow
# ---------------------------------------------------------------------------------------------------------------
def resolve_paths(cfg: Config) -> Config:
    """Absolute paths and tracking URI: Ray processes run in other working directories (and maybe other nodes)."""
    from pipelines.tracking import resolve_uri

    storage = cfg.ray.storage_path
    return from_dict(
        {
            "data": {"root": abspath(cfg.data.root)},
            "train": {
                "output_dir": abspath(cfg.train.output_dir),
                "init_from": abspath(cfg.train.init_from) if cfg.train.init_from else "",
            },
            "ray": {"storage_path": storage if "://" in storage else abspath(storage)},
            "tracking": {"uri": resolve_uri(cfg.tracking.uri)},
        },
        cfg,
    )


def init_ray(cfg: Config, *, verbose: bool = True) -> bool:
    """Join ``ray.address`` (or the cluster of a Ray job), else start a local Ray; True when this call connected.

    ``verbose=False``: what Ray's processes print stays in its log files (``pipelines.console``), and the driver's
    own Ray logging shows warnings only.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **quiet)
        elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job's cluster
            ray.init(**quiet)
        else:
            # the dashboard stays on: Ray Train's placement-group cleaner needs the State API it serves
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
    except ConnectionError as e:
        raise SetupError(f"cannot connect to Ray at {cfg.ray.address or os.environ.get('RAY_ADDRESS')}: {e}") from e
    return True


def check_resources(cfg: Config) -> None:
    """Fail instead of waiting forever when the workers and the data tasks cannot all be placed (local Ray only:
    an autoscaling cluster may still grow)."""
    import ray

    total_cpu = ray.cluster_resources().get("CPU", 0.0)
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.ray.data_cpus
    if need_cpu > total_cpu + 1e-9:
        raise ConfigError(
            f"{cfg.ray.num_workers} workers x ray.cpus_per_worker={cfg.ray.cpus_per_worker} CPUs + "
            f"ray.data_cpus={cfg.ray.data_cpus} for the data tasks need {need_cpu:g} CPUs, but this Ray has "
            f"{total_cpu:g}: lower ray.num_workers or ray.cpus_per_worker (fractions are fine), or join a bigger "
            "cluster with ray.address"
        )
    if cfg.ray.use_gpu:
        need_gpu, total_gpu = cfg.ray.num_workers * cfg.ray.gpus_per_worker, ray.cluster_resources().get("GPU", 0.0)
        if need_gpu > total_gpu + 1e-9:
            raise ConfigError(f"ray.use_gpu=true needs {need_gpu:g} GPUs but this Ray has {total_gpu:g}")


def remove_ray_run(cfg: Config) -> None:
    """--fresh: delete the run's Ray storage folder (local storage only), so that Ray Train starts over."""
    if "://" in cfg.ray.storage_path:
        raise ConfigError(
            f"--fresh deletes local run folders only; {ray_run_dir(cfg)} is remote: choose a new train.run_name"
        )
    path = Path(ray_run_dir(cfg))
    if not path.exists():
        return
    if not any(
        (path / m).exists() for m in (".validate_storage_marker", "checkpoint_manager_snapshot.json", RUN_CONFIG_FILE)
    ):
        raise ConfigError(f"--fresh: {path} does not look like a Ray Train run folder; not deleting it")
    shutil.rmtree(path)
    print(f"--fresh: deleted the Ray Train run folder {path}", flush=True)


RUN_CONFIG_FILE = "rgnet_config.json"  # in the Ray run folder: the config the run started with
SAME_RUN_SECTIONS = ("data", "windows", "model")  # what a resumed run's checkpoints depend on


def check_same_run(cfg: Config) -> None:
    """A resumed Ray run must be the same experiment: same data, windows and model as when it started.

    Ray Train resumes by (storage path, run name) alone, so `rgnet train` started elsewhere with the defaults would
    otherwise continue another run's checkpoints.  The first start records its config in the run folder (local
    storage only); a later start with different data/windows/model keys is an error naming them.
    """
    from pipelines.tracking import flatten
    from rgnet.config import to_dict

    if "://" in cfg.ray.storage_path:
        return
    path = Path(ray_run_dir(cfg)) / RUN_CONFIG_FILE
    now = {k: v for k, v in to_dict(cfg).items() if k in SAME_RUN_SECTIONS}
    if path.exists():
        before = flatten(json.loads(path.read_text()))
        changed = sorted(k for k, v in flatten(now).items() if before.get(k) != v)
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)} -> {flatten(now)[k]}" for k in changed[:5])
            more = ", ..." if len(changed) > 5 else ""
            raise ConfigError(
                f"Ray run {ray_run_dir(cfg)} was started with other settings ({shown}{more}): resuming it would "
                "continue that experiment. Use --fresh to start over, or another train.run_name"
            )
        return
    from rgnet.io import atomic_write_json

    atomic_write_json(path, now)


def fit_on_ray(cfg: Config, handle: Any, *, verbose: bool = False, callbacks: list[Any] | None = None) -> Any:
    """Build the TorchTrainer and run it; returns the ``ray.train.Result``.  Each worker streams its part of every
    global step through a Ray Data dataset of its own (``pipelines.data``), so no dataset is passed here.

    ``handle`` (a ``tracking.RunHandle`` or None) gets the epochs through :class:`pipelines.tracking.EpochLogger`;
    ``callbacks`` are further ``ray.train.UserCallback`` objects (a Tune trial passes Ray's ``TuneReportCallback``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.tracking import EpochLogger
    from pipelines.train_worker import SELECTION_SCORE, train_fn_per_worker
    from rgnet.config import to_dict

    user_callbacks: list[Any] = [EpochLogger(handle.uri, handle.run_id, cfg.train.epochs)] if handle is not None else []
    user_callbacks += callbacks or []
    resources = {"CPU": cfg.ray.cpus_per_worker} | ({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {})
    if cfg.ray.use_gpu and cfg.train.precision == "fp32":
        log.info("training on GPUs in fp32; train.precision=bf16 (or fp16) turns on autocast")
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,  # gloo on CPU, NCCL on GPU (Ray's default backend choice)
            resources_per_worker=resources,
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=cfg.ray.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.ray.checkpoints_to_keep,  # Ray also keeps the latest, for resume
                checkpoint_score_attribute=SELECTION_SCORE,
                checkpoint_score_order="max",
            ),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            callbacks=user_callbacks,
        ),
    )
    return trainer.fit()


def run_ray(
    cfg: Config, *, preset: str | None = None, fresh: bool = False, test: bool = True, verbose: bool = False
) -> dict[str, Any]:
    """Distributed training and evaluation (module docstring); returns the final reports, the best checkpoint path
    and the MLflow run id."""
    from pipelines import tracking
    from pipelines.console import relaying
    from rgnet.data.dataset import open_split
    from rgnet.data.samples import steps_per_epoch

    t_start = time.perf_counter()
    if cfg.ray.num_workers < 1:
        raise ConfigError("ray.num_workers must be >= 1 for training on Ray (use --local for one process)")
    if cfg.train.batch_size % cfg.ray.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch (queries per optimizer step) and must split "
            f"evenly over ray.num_workers={cfg.ray.num_workers}: choose a multiple of the number of workers"
        )
    cfg = resolve_paths(cfg)
    prepare_data(cfg)
    # 1. Data, opened here: a missing or malformed dataset fails now, before Ray and its workers start.
    splits = {"train": open_split(cfg.data, cfg.data.train_split), "val": open_split(cfg.data, cfg.data.val_split)}
    if test and cfg.data.test_split and cfg.data.test_split != cfg.data.val_split:
        splits["test"] = open_split(cfg.data, cfg.data.test_split)
    num_train = len(splits["train"].records)
    steps = steps_per_epoch(num_train, cfg.train.batch_size, cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(
            f"{num_train} training queries make no full batch of train.batch_size={cfg.train.batch_size}: lower it"
        )
    if not fresh:
        check_same_run(cfg)  # resuming another experiment's checkpoints is an error, before anything is created
    # 2. Tracking, probed before Ray starts: an unreachable server is an error within seconds.
    handle = (
        tracking.open_run(cfg, run_key=ray_run_dir(cfg), preset=preset, fresh=fresh) if cfg.tracking.enabled else None
    )
    if fresh:
        remove_ray_run(cfg)
        check_same_run(cfg)  # records the new run's settings
    elif Path(ray_run_dir(cfg), "checkpoint_manager_snapshot.json").exists():
        print(f"resuming Ray Train run {ray_run_dir(cfg)} from its latest checkpoint (--fresh starts over)", flush=True)
    if handle is not None:
        tracking.log_datasets(handle, splits)
        verb = "reusing" if handle.resumed else "created"
        print(
            f"MLflow: {verb} run {handle.run_id} in experiment {cfg.tracking.experiment!r} at {handle.uri}", flush=True
        )
    status, connected = "FAILED", False
    try:
        # 3. Ray
        t_ray = time.perf_counter()
        connected = init_ray(cfg, verbose=verbose)
        ray_start_s = time.perf_counter() - t_ray
        if not cfg.ray.address and not os.environ.get("RAY_ADDRESS"):
            check_resources(cfg)
        print(
            f"training {cfg.train.run_name}: {cfg.ray.num_workers} Ray Train workers x {cfg.ray.cpus_per_worker:g} CPU"
            f"{' + GPU' if cfg.ray.use_gpu else ''}, {num_train} train / {len(splits['val'].records)} val queries, "
            f"{steps} steps per epoch of {cfg.train.batch_size} queries ({cfg.train.batch_size // cfg.ray.num_workers} "
            f"per worker), {cfg.train.epochs} epochs; checkpoints in {ray_run_dir(cfg)}",
            flush=True,
        )
        # 4. Train
        t_fit = time.perf_counter()
        with contextlib.nullcontext() if verbose else relaying(ray_run_dir(cfg)):
            result = fit_on_ray(cfg, handle, verbose=verbose)
        fit_s = time.perf_counter() - t_fit
        # 5. Evaluate the best checkpoint, log the artifacts
        t_final = time.perf_counter()
        out = finish_training(cfg, result, splits, handle)
        final_s = time.perf_counter() - t_final
        out["time"] = time_split(out.pop("history"), ray_start_s, fit_s, final_s, time.perf_counter() - t_start)
        print(format_time_split(out["time"]), flush=True)
        status = "FINISHED"
        return out
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (`ray job stop`), which Ray turns into an exit
        status = "KILLED"
        raise
    finally:
        if handle is not None:
            tracking.finish(handle, status)
        if connected:
            import ray

            ray.shutdown()


def finish_training(cfg: Config, result: Any, splits: dict[str, Any], handle: Any) -> dict[str, Any]:
    """Copy the best checkpoint to ``output_dir/run_name``, evaluate it on val (and test), log it all to MLflow."""
    from pipelines import tracking
    from pipelines.train_worker import SELECTION_SCORE, VAL_PREDICTIONS_FILE, VAL_REPORT_FILE
    from rgnet.eval.metrics import format_table
    from rgnet.eval.predictions import write_predictions
    from rgnet.io import atomic_write_json, atomic_write_text
    from rgnet.train import checkpoint as ckpt
    from rgnet.train.loop import evaluate_model, resolve_device

    best = result.get_best_checkpoint(SELECTION_SCORE, "max") or result.checkpoint
    if best is None or result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {ray_run_dir(cfg)} reported no checkpoint")
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run_dir / "config.yaml")
    with best.as_directory() as d:
        shutil.copyfile(Path(d) / ckpt.CHECKPOINT_FILE, run_dir / "best.pt")
        for name, dest in (
            (VAL_REPORT_FILE, "best_val_report.json"),
            (VAL_PREDICTIONS_FILE, "best_val_predictions.jsonl"),
        ):
            if (Path(d) / name).exists():
                shutil.copyfile(Path(d) / name, run_dir / dest)
    history = tracking.read_history(result.checkpoint)  # the latest checkpoint holds every epoch
    atomic_write_json(run_dir / "history.json", history)
    out_history = history
    if handle is not None:  # an epoch whose report was never logged (driver killed in between) is logged now
        tracking.EpochLogger(handle.uri, handle.run_id, cfg.train.epochs).log_history(history)

    device = resolve_device(cfg.train.device)
    model, _ = ckpt.load_model(run_dir / "best.pt", device)
    best_epoch = int(ckpt.load_checkpoint(run_dir / "best.pt")["epoch"])
    out: dict[str, Any] = {
        "best_epoch": best_epoch,
        "best_checkpoint": str(run_dir / "best.pt"),
        "history": out_history,
    }
    tables = []
    for name, data in splits.items():
        if name == "train":
            continue
        report, rows = evaluate_model(model.to(device), data, cfg, device)
        atomic_write_json(run_dir / f"report_{name}.json", report)
        write_predictions(run_dir / f"predictions_{name}.jsonl", rows)
        table = f"{name} split ({data.split}), best checkpoint (epoch {best_epoch}):\n{format_table(report)}"
        tables.append(table)
        print("\n" + table, flush=True)
        out[name] = report
    atomic_write_text(run_dir / "metrics.txt", "\n\n".join(tables) + "\n")

    print(f"\nrun folder: {run_dir}\n  evaluate again: rgnet evaluate --checkpoint {run_dir / 'best.pt'} --split val")
    if handle is not None:
        out["run_id"] = handle.run_id
        out["model_uri"], out["registered_model_uri"] = log_results(cfg, handle, run_dir, history, out, best_epoch)
        print(
            f"  MLflow run {handle.run_id}; best model: rgnet evaluate --model-uri {out['model_uri']} "
            f"--tracking-uri {handle.uri} --split val"
        )
        if out["registered_model_uri"]:
            print(f"  registered as {out['registered_model_uri']}")
        url = tracking.run_url(handle.uri, handle.experiment_id, handle.run_id)
        print(
            f"  open the run: {tracking.ui_command(handle.uri)}, then {url}"
            if handle.uri.startswith("sqlite")
            else f"  open the run: {url}"
        )
    return out


def time_split(
    history: list[dict[str, Any]], ray_start_s: float, fit_s: float, final_s: float, total_s: float
) -> dict[str, float]:
    """Where a run's wall time went, from the driver's clocks and the epochs' own (``train/seconds``: the steps,
    ``train/data_wait_s``: of which waiting for batches, ``train/eval_s``: validation).  Only the epochs this attempt
    trained are summed (a resumed run's history also holds the earlier attempts' epochs)."""
    attempt = history[-1].get("resumed_after_epoch", 0) if history else 0
    mine = [h for h in history if h.get("resumed_after_epoch", 0) == attempt]
    steps = sum(float(h.get("train/seconds", 0.0)) for h in mine)
    wait = sum(float(h.get("train/data_wait_s", 0.0)) for h in mine)
    val = sum(float(h.get("train/eval_s", 0.0)) for h in mine)
    return {
        "total_s": total_s,
        "setup_s": max(0.0, total_s - ray_start_s - fit_s - final_s),  # data checks, MLflow run, Ray job set-up
        "ray_start_s": ray_start_s,
        "train_run_s": fit_s,
        "compute_s": steps - wait,
        "data_wait_s": wait,
        "validation_s": val,
        "workers_checkpoints_other_s": max(0.0, fit_s - steps - val),
        "final_evaluation_s": final_s,
    }


def format_time_split(t: dict[str, float], *, local: bool = False) -> str:
    """One line; ``local``: a run in this process (no Ray start, no workers to start)."""
    head = "training" if local else f"Ray start {t['ray_start_s']:.0f} s + Ray Train run"
    other = "checkpoints" if local else "worker start + checkpoints + reports"
    return (
        f"time: total {t['total_s']:.0f} s = set-up {t['setup_s']:.0f} s + {head} {t['train_run_s']:.0f} s (compute "
        f"{t['compute_s']:.0f} s, waiting for data {t['data_wait_s']:.1f} s, validation {t['validation_s']:.0f} s, "
        f"{other} {t['workers_checkpoints_other_s']:.0f} s) + final evaluation and logging "
        f"{t['final_evaluation_s']:.0f} s"
    )


def log_results(
    cfg: Config, handle: Any, run_dir: Path, history: list[dict[str, Any]], out: dict[str, Any], best_epoch: int
) -> tuple[str, str | None]:
    """Artifacts and final metrics of a finished run, the best checkpoint as the run's MLflow model (one logged model
    per best epoch: a resumed run that finds a new best logs a new one) and its registry version; returns the model's
    runs:/ URI and its registry URI."""
    from mlflow.entities import Metric

    from pipelines import mlflow_model, tracking

    client = handle.client()
    model_id = mlflow_model.log_best_model(handle, run_dir / "best.pt", run_dir / "config.yaml", best_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        plots = Path(tmp) / "plots"
        plots.mkdir()
        for png in tracking.plot_history(history, plots, cfg.train.selection_metric):
            client.log_artifact(handle.run_id, str(png), "plots")
    for name in ("best_val_report.json", "best_val_predictions.jsonl"):
        if (run_dir / name).exists():
            client.log_artifact(handle.run_id, str(run_dir / name), "best_epoch")
    for name in (
        "metrics.txt",
        "history.json",
        *(f"report_{s}.json" for s in ("val", "test")),
        *(f"predictions_{s}.jsonl" for s in ("val", "test")),
    ):
        if (run_dir / name).exists():
            client.log_artifact(handle.run_id, str(run_dir / name), "reports")
    # The best model's metrics at step = its epoch, linked to it and to the dataset they were measured on; a rerun of
    # the same finished run (same values) logs nothing again, a resumed run with a new best logs the new values.
    have = client.get_run(handle.run_id).data.metrics
    ts = int(__import__("time").time() * 1000)
    metrics = [] if have.get("best_epoch") == best_epoch else [Metric("best_epoch", float(best_epoch), ts, best_epoch)]
    for split in ("val", "test"):
        name, digest = handle.datasets.get(split, (None, None))
        for k, v in out.get(split, {}).get("metrics", {}).items():
            key = tracking.metric_key(f"final_{split}/{k}")
            if have.get(key) != float(v):
                metrics.append(
                    Metric(key, float(v), ts, best_epoch, model_id=model_id, dataset_name=name, dataset_digest=digest)
                )
    if metrics:
        client.log_batch(handle.run_id, metrics=metrics)
    model_uri = f"runs:/{handle.run_id}/{mlflow_model.MODEL_NAME}"
    registered = tracking.register_model(
        handle, f"{cfg.tracking.experiment}-{cfg.train.run_name}", model_id, best_epoch
    )
    return model_uri, registered


def _main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.local:
        reports = run_local(cfg, fresh=args.fresh, test=not args.no_test)
    else:
        reports = run_ray(
            cfg,
            preset=args.preset or ("tiny" if args.smoke_test and not args.config else None),
            fresh=args.fresh,
            test=not args.no_test,
            verbose=args.verbose,
        )
    log.debug("final reports: %s", json.dumps(reports)[:2000])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(_main, args)


if __name__ == "__main__":
    sys.exit(main())
