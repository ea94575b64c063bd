"""The Ray Train driver: ``rgnet train`` without ``--local``, and each trial of ``rgnet tune``
(:func:`fit_on_ray`).

:func:`train_on_ray` runs, in order:

1. data: generate the synthetic dataset if asked and absent, then open every split here, so that a missing or
   malformed dataset fails with the reader's message before Ray or any worker starts;
2. tracking: probe the MLflow store (an unreachable server fails in seconds) and create the run, or reuse the run of
   an interrupted attempt with the same storage path and run name;
3. Ray: join ``ray.address`` (or the cluster of a ``ray job submit``) or start a local Ray;
4. ``TorchTrainer.fit()`` (:func:`fit_on_ray`; the workers run ``pipelines.train_worker``): a run with the same
   ``RunConfig(name, storage_path)`` as an interrupted one resumes from its latest checkpoint (``fresh`` deletes it
   and starts over); worker failures restart the worker group from the latest checkpoint, up to ``ray.max_failures``
   times;
5. the best checkpoint (by ``train.selection_metric`` on the validation split) is evaluated on val and test, and
   logged to MLflow with the reports, the predictions and the plots; the command that opens the run and the time
   split are printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines import mlflow_model, tracking
from pipelines.common import ray_run_dir
from pipelines.console import relaying
from pipelines.runtime import check_resources, init_ray, resolve_paths, tracked_run
from pipelines.train_worker import SELECTION_SCORE, VAL_PREDICTIONS_FILE, VAL_REPORT_FILE, train_fn_per_worker
from rgnet.config import Config, ConfigError, save_yaml, to_dict
from rgnet.data.dataset import open_split
from rgnet.data.samples import steps_per_epoch
from rgnet.data.synthetic import ensure_configured_dataset
from rgnet.io import atomic_write_json, atomic_write_text
from rgnet.train import checkpoint as ckpt
from rgnet.train.loop import resolve_device, set_threads
from rgnet.train.run import evaluate_best, format_time_split, time_split

log = logging.getLogger("rgnet.train")


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
    if "://" in cfg.ray.storage_path:
        return
    path = Path(ray_run_dir(cfg)) / RUN_CONFIG_FILE
    now = {k: v for k, v in to_dict(cfg).items() if k in SAME_RUN_SECTIONS}
    if path.exists():
        before = tracking.flatten(json.loads(path.read_text()))
        changed = sorted(k for k, v in tracking.flatten(now).items() if before.get(k) != v)
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)} -> {tracking.flatten(now)[k]}" for k in changed[:5])
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

    user_callbacks: list[Any] = []
    if handle is not None:
        user_callbacks.append(tracking.EpochLogger(handle.uri, handle.run_id, cfg.train.epochs))
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


def train_on_ray(
    cfg: Config, *, preset: str | None = None, fresh: bool = False, test: bool = True, verbose: bool = False
) -> dict[str, Any]:
    """Distributed training and evaluation (module docstring); returns the final reports, the best checkpoint path,
    the MLflow run id and the time split."""

    t_start = time.perf_counter()
    if cfg.ray.num_workers < 1:
        raise ConfigError("ray.num_workers must be >= 1 for training on Ray (use --local for one process)")
    if cfg.train.batch_size % cfg.ray.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch (queries per optimizer step) and must split "
            f"evenly over ray.num_workers={cfg.ray.num_workers}: choose a multiple of the number of workers"
        )
    cfg = resolve_paths(cfg)
    ensure_configured_dataset(cfg.data)
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
    with tracked_run(handle) as run:
        # 3. Ray
        t_ray = time.perf_counter()
        run.connected = init_ray(cfg, verbose=verbose)
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
    return out


def finish_training(cfg: Config, result: Any, splits: dict[str, Any], handle: Any) -> dict[str, Any]:
    """Copy the best checkpoint to ``output_dir/run_name``, evaluate it on val (and test), log it all to MLflow."""
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
    set_threads(cfg.train.threads, os.cpu_count() or 1)  # the same count as a --local run's final evaluation
    model, _ = ckpt.load_model(run_dir / "best.pt", device)
    best_epoch = int(ckpt.load_checkpoint(run_dir / "best.pt")["epoch"])
    out: dict[str, Any] = {
        "best_epoch": best_epoch,
        "best_checkpoint": str(run_dir / "best.pt"),
        "history": out_history,
    }
    reports, tables = evaluate_best(
        model, [(n, d) for n, d in splits.items() if n != "train"], cfg, device, run_dir, f" (epoch {best_epoch})"
    )
    out.update(reports)
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


def log_results(
    cfg: Config, handle: Any, run_dir: Path, history: list[dict[str, Any]], out: dict[str, Any], best_epoch: int
) -> tuple[str, str | None]:
    """Artifacts and final metrics of a finished run, the best checkpoint as the run's MLflow model (one logged model
    per best epoch: a resumed run that finds a new best logs a new one) and its registry version; returns the model's
    runs:/ URI and its registry URI."""
    from mlflow.entities import Metric

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
