"""Ray Tune + Optuna sweeps over a space file, compared in MLflow: what ``rgnet tune`` and ``rgnet study`` run.

The current Tune-drives-Train pattern (Ray 2.60, Train V2): every trial is a small *driver* function
(:func:`trial_driver`) that builds the trial's config (the space's base config + the sampled point), opens an MLflow
child run and runs a TorchTrainer exactly as ``rgnet train`` does (:func:`pipelines.trainer.fit_on_ray`), with Ray's
``TuneReportCallback`` forwarding rank 0's per-epoch metrics to Tune.  The searcher is ``OptunaSearch`` (TPE, seeded)
behind a ``ConcurrencyLimiter``; spaces with ``grid`` keys or grid variants (e.g. the ablation grid) use Tune's grid
search instead, since a grid is not something TPE samples.  An ASHA scheduler stops poor trials at its rungs (one
rung per epoch).

Names and storage: the sweep lives in ``<ray.storage_path>/<name>`` (``--name``, default the space file's stem);
each trial's Train run is ``<name>-<trial id>`` in ``<ray.storage_path>/<name>-trials``, so a restored sweep resumes
an unfinished trial's Train run from its last checkpoint.  Re-running the same command restores an interrupted
sweep (``Tuner.restore``): finished trials are not re-run.  ``--fresh`` starts over.

MLflow: one parent run per sweep (found again on restore), one child run per trial (tag ``mlflow.parentRunId``),
so the UI's compare view shows the trials side by side.  At the end the parent gets the best trial's point and
metrics, the space file, the best config, and plots (optimization history, metric vs each swept parameter).

A child run's status is decided in this driver, from Tune's own account of the trial (:class:`TrialRunStatus`, a
Tune callback), not by the trial: a trial that reported all its epochs is FINISHED, one that ASHA stopped earlier is
KILLED with the tag ``rgnet.stopped_early=true``, one that raised is FAILED with the error as the tag ``rgnet.error``
and the artifact ``error.txt``.  The trial cannot tell: when ASHA stops a trial (at a rung, or at ``max_t`` right
after the last epoch's report, even for a trial that is about to return), Tune removes the trial's placement group,
which destroys the Ray Train controller inside it; the trial's ``TorchTrainer.fit()`` then raises ``ActorDiedError``
and the trial actor is terminated a moment later, so whatever the trial would write last (FAILED from an exception
handler, or nothing) depends on a race.

"Best" is one rule everywhere: the trial whose *last* reported value of the metric Tune optimises is best in Tune's
mode, the value Optuna is told when a trial ends, ASHA compares at its rungs and Tune's "Current best trial" line
shows; the summary also prints each trial's best epoch.  Tune's CSV and TensorBoard loggers are off unless
``--loggers`` asks for them; its JSON results log is always written (the summary reads the per-epoch values from it).

Windows are rebuilt per trial from the same feature files: the Ray Data map stage cuts windows with the trial's
``windows.*`` settings; nothing is copied per trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rgnet.config import Config, ConfigError, apply_overrides, from_dict, save_yaml, to_dict
from rgnet.search_space import VARIANT_KEY, SearchSpace, load_space, trial_overrides

log = logging.getLogger("rgnet.tune")

SETTINGS_FILE = "sweep_settings.json"  # the settings trials get, kept next to sweep.json so a restore reuses them
LOGGERS = ("csv", "json", "tensorboard")


# ---------------------------------------------------------------------------------------------------------------
# The space in Tune's terms
# ---------------------------------------------------------------------------------------------------------------
def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """Space file -> Tune search-space objects (``int`` bounds are inclusive, Tune's ``randint`` is not)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.params.items():
        lo_hi = d.values
        if d.kind == "uniform":
            out[key] = tune.uniform(*lo_hi)
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(*lo_hi)
        elif d.kind == "int":
            out[key] = tune.randint(lo_hi[0], lo_hi[1] + 1)
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.values))
        else:
            out[key] = tune.grid_search(list(d.values))
    if space.variants:
        names = list(space.variants)
        out[VARIANT_KEY] = tune.grid_search(names) if space.variant_mode == "grid" else tune.choice(names)
    return out


def uses_grid(space: SearchSpace) -> bool:
    return any(d.is_grid for d in space.params.values()) or (bool(space.variants) and space.variant_mode == "grid")


def metric_of(space: SearchSpace, cfg: Config) -> tuple[str, str]:
    """The reported key Tune optimises and its mode: ``val/<metric>`` (max) or a ``train/...`` loss (min)."""
    name = space.metric or cfg.train.selection_metric
    if name.startswith("train/"):
        return name, "min"
    return (name if name.startswith("val/") else f"val/{name}"), "max"


def trial_config(base: Config, space: SearchSpace, point: dict[str, Any]) -> Config:
    """The config of one trial: the sweep's base config with the sampled point applied."""
    return apply_overrides(base, trial_overrides(space, point))


# ---------------------------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial actor)
# ---------------------------------------------------------------------------------------------------------------
def trial_driver(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable: build the trial's config, open its MLflow child run, fit a TorchTrainer.

    ``config`` is the sampled point only; ``sweep`` (bound with ``tune.with_parameters``) carries the sweep's
    settings.  The child run's final status is set by the sweep driver (:class:`TrialRunStatus`), except here when
    training returned normally."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import tracking
    from pipelines.trainer import fit_on_ray
    from rgnet.data.dataset import open_split

    space = load_space(sweep["space"])
    point = dict(config)
    trial_id = ray.tune.get_context().get_trial_id()  # Ray: stable across restores, so Train resumes by name
    cfg = trial_config(from_dict(sweep["base"]), space, point)
    cfg = from_dict(
        {"train": {"run_name": f"{sweep['name']}-{trial_id}"}, "ray": {"storage_path": sweep["trials_storage"]}}, cfg
    )
    run_key = f"{sweep['trials_storage']}/{cfg.train.run_name}"
    train_split = open_split(cfg.data, cfg.data.train_split)
    handle = None
    if sweep["parent_run_id"]:
        tags = {
            "mlflow.parentRunId": sweep["parent_run_id"],
            "rgnet.sweep": sweep["name"],
            "rgnet.trial_id": trial_id,
            **{f"rgnet.point.{k}": json.dumps(v) for k, v in point.items()},
        }
        handle = tracking.open_run(cfg, run_key=run_key, preset=space.preset, tags=tags, command="rgnet tune")
        val_split = open_split(cfg.data, cfg.data.val_split)
        tracking.log_datasets(handle, {"train": train_split, "val": val_split})
        val_split.close()
    fit_on_ray(cfg, handle, callbacks=[TuneReportCallback()])
    if handle is not None:
        tracking.finish(handle, "FINISHED")


# ---------------------------------------------------------------------------------------------------------------
# The sweep (the driver process)
# ---------------------------------------------------------------------------------------------------------------
def tune_loggers(spec: str) -> list[Any]:
    """Tune logger callbacks for ``--loggers`` (JSON always: the summary reads each trial's results from it)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    names = {n.strip() for n in spec.split(",") if n.strip()}
    unknown = sorted(names - set(LOGGERS))
    if unknown:
        raise ConfigError(f"--loggers: unknown logger(s) {', '.join(unknown)} (choose from {', '.join(LOGGERS)})")
    out: list[Any] = [JsonLoggerCallback()]
    if "csv" in names:
        out.append(CSVLoggerCallback())
    if "tensorboard" in names:
        out.append(TBXLoggerCallback())
    return out


@contextmanager
def no_default_loggers() -> Iterator[None]:
    """Tune adds its CSV, JSON and TensorBoard loggers to every run unless this variable is set (read when the run
    starts, in ``ray.tune.utils.callback._create_default_callbacks``); the loggers asked for are passed explicitly."""
    old = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"]
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = old


class _InterruptSeen(logging.Handler):
    """Notices Tune's own Ctrl-C: ``Tuner.fit()`` then stops the running trials, marks them TERMINATED (even one that
    never reported) and returns without raising, so the trial counts cannot tell an interrupted sweep from a finished
    one; Tune's SIGINT handler logs this warning (``ray.tune.tune``, Ray 2.60) and nothing else records it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Stop signal received"):
            self.seen = True


@contextmanager
def watching_for_interrupt() -> Iterator[_InterruptSeen]:
    watcher = _InterruptSeen()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addHandler(watcher)
    try:
        yield watcher
    finally:
        tune_log.removeHandler(watcher)


@dataclass(frozen=True)
class SweepOptions:
    """One sweep: the space file (a path or a tune_spaces/ name), how many trials and how many at once, the sweep's
    name (default: the space file's stem; the same name restores it), the Optuna seed, ASHA's grace period and
    reduction factor, where the best config goes, Tune's loggers and the config overrides."""

    space: str
    trials: int = 8
    concurrency: int = 1
    name: str | None = None
    fresh: bool = False
    seed: int = 0
    grace_period: int = 1
    reduction_factor: int = 2
    best_out: str | None = None
    loggers: str = "json"
    overrides: tuple[str, ...] = ()


def run_sweep(opts: SweepOptions) -> dict[str, Any]:
    """Run (or restore) the sweep; returns its summary, or ``{"interrupted": True, ...}`` when it was stopped."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from pipelines import tracking
    from pipelines.common import resolve_space_path
    from pipelines.runtime import init_ray, resolve_paths, tracked_run
    from rgnet.data.dataset import open_split
    from rgnet.data.synthetic import ensure_configured_dataset
    from rgnet.io import atomic_write_json

    loggers = tune_loggers(opts.loggers)
    space_path = resolve_space_path(opts.space).resolve()
    space = load_space(space_path)
    name = opts.name or space_path.stem
    base = resolve_paths(space.base_config(list(opts.overrides)))
    metric, mode = metric_of(space, base)
    storage = base.ray.storage_path
    sweep_dir = f"{storage.rstrip('/')}/{name}"
    trials_storage = f"{storage.rstrip('/')}/{name}-trials"
    settings_file = Path(base.train.output_dir) / name / SETTINGS_FILE
    if opts.fresh:
        for path in (sweep_dir, trials_storage):
            if "://" not in path and Path(path).exists():
                shutil.rmtree(path)
        settings_file.unlink(missing_ok=True)
    ensure_configured_dataset(base.data)
    splits = {  # a missing or malformed dataset fails here, before any trial starts
        "train": open_split(base.data, base.data.train_split),
        "val": open_split(base.data, base.data.val_split),
    }

    parent = None
    if base.tracking.enabled:
        parent_cfg = from_dict({"train": {"run_name": f"sweep-{name}"}}, base)
        parent = tracking.open_run(
            parent_cfg,
            run_key=f"tune:{sweep_dir}",
            preset=space.preset,
            fresh=opts.fresh,
            tags={"rgnet.sweep": name},
            command="rgnet tune",
        )
        tracking.log_datasets(parent, splits)
        client = parent.client()
        client.log_artifact(parent.run_id, str(space_path), "space")
        print(f"MLflow: sweep run {parent.run_id} at {parent.uri}", flush=True)
        print(f"  open it: {tracking.run_url(parent.uri, parent.experiment_id, parent.run_id)}", flush=True)
    for split in splits.values():
        split.close()

    with tracked_run(parent) as run:
        run.connected = init_ray(base)
        # a trial is only a driver (the Train workers hold the CPUs/GPUs); on a cluster whose head offers the custom
        # resource TRAIN_DRIVER (cluster/*.yaml) the drivers go there: non-spot, and next to the MLflow server
        driver_resources: dict[str, float] = {"cpu": 0.25}
        if ray.cluster_resources().get("TRAIN_DRIVER", 0) > 0:
            driver_resources["TRAIN_DRIVER"] = 1.0
        restored = not opts.fresh and tune.Tuner.can_restore(
            os.path.abspath(sweep_dir) if "://" not in sweep_dir else sweep_dir
        )
        # The sweep's settings reach the trials through tune.with_parameters, not the param space: Tune prints a
        # trial's whole param space at its start and in every "Current best trial" line.  A restore reuses the
        # settings the sweep started with (its base config), as Tune reuses its param space.
        if restored and settings_file.exists():
            sweep_settings = json.loads(settings_file.read_text())
        else:
            sweep_settings = {
                "space": str(space_path),
                "base": to_dict(base),
                "name": name,
                "trials_storage": trials_storage,
                "parent_run_id": parent.run_id if parent is not None else "",
            }
            atomic_write_json(settings_file, sweep_settings)
        trainable = tune.with_resources(tune.with_parameters(trial_driver, sweep=sweep_settings), driver_resources)
        if restored:
            print(f"restoring sweep {sweep_dir}: finished trials are kept, unfinished ones resume", flush=True)
            tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            param_space = tune_param_space(space)
            grid = uses_grid(space)
            if grid:
                num_samples = max(1, math.ceil(opts.trials / space.num_grid_points()))
                search_alg = None
                print(f"grid space: {space.num_grid_points()} points x {num_samples} = trials", flush=True)
            else:
                num_samples = opts.trials
                search_alg = ConcurrencyLimiter(OptunaSearch(seed=opts.seed), max_concurrent=opts.concurrency)
            scheduler = ASHAScheduler(
                time_attr="training_iteration",  # one iteration per epoch report
                max_t=base.train.epochs,
                grace_period=min(opts.grace_period, base.train.epochs),
                reduction_factor=opts.reduction_factor,
            )
            callbacks: list[Any] = list(loggers)
            if parent is not None:
                callbacks.append(
                    tracking.TrialRunStatus(parent.uri, parent.experiment_id, parent.run_id, base.train.epochs)
                )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    num_samples=num_samples,
                    max_concurrent_trials=opts.concurrency,
                    search_alg=search_alg,
                    scheduler=scheduler,
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1, callbacks=callbacks),
            )
        print(
            f"sweep {name}: {space_path.name}, optimising {metric} ({mode}; best = the best last-epoch value, as "
            f"Tune's 'Current best trial'), {opts.trials} trials, {opts.concurrency} at a time; storage {sweep_dir}",
            flush=True,
        )
        with no_default_loggers(), watching_for_interrupt() as interrupt:
            results = tuner.fit()
        expected = (
            space.num_grid_points() * max(1, math.ceil(opts.trials / space.num_grid_points()))
            if uses_grid(space)
            else opts.trials
        )
        done = results.num_terminated + results.num_errors
        if interrupt.seen or done < expected:  # Ctrl-C: Tune saved the sweep and returned early (it does not raise)
            run.status = "KILLED"
            if parent is not None:
                tracking.mark_unfinished_children(parent)
            print(
                f"sweep {name} interrupted after {done} of {expected} trials; the same command resumes it "
                "(finished trials are kept)",
                flush=True,
            )
            return {"interrupted": True, "finished_trials": done, "trials": expected}
        summary = summarise(results, space, base, metric, mode, name, opts.best_out, parent)
        if parent is not None:
            tracking.mark_unfinished_children(parent)
        return summary


def summarise(
    results: Any,
    space: SearchSpace,
    base: Config,
    metric: str,
    mode: str,
    name: str,
    best_out: str | None,
    parent: Any,
) -> dict[str, Any]:
    """Best trial -> preset YAML; trial table; MLflow parent params/metrics/plots.

    The best trial is Ray's ``ResultGrid.get_best_result(metric, mode, scope="last")``: the rule Tune's own
    "Current best trial" line, ASHA and Optuna apply (module docstring); each trial's best epoch is shown too."""
    from pipelines import tracking
    from rgnet.io import atomic_write_text

    pick = max if mode == "max" else min
    rows: list[dict[str, Any]] = []
    for r in results:
        point = dict(r.config or {})
        df = r.metrics_dataframe
        last = r.metrics or {}
        epochs = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
        values = df[metric].dropna().tolist() if df is not None and metric in df else []
        rows.append(
            {
                "trial_id": last.get("trial_id"),
                "point": point,
                "epochs": epochs,
                "stopped_early": r.error is None and 0 < epochs < trial_config(base, space, point).train.epochs,
                "error": None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:500],
                "last": values[-1] if values else None,  # what Tune ranks by
                "best": pick(values) if values else None,  # the trial's best epoch
            }
        )
    try:
        best_result = results.get_best_result(metric=metric, mode=mode, scope="last")
    except RuntimeError as e:  # no trial reported the metric
        raise RuntimeError(f"sweep {name}: no trial reported {metric} ({e}); see the trial errors: {rows}") from e
    best_row = next(row for row in rows if row["trial_id"] == best_result.metrics.get("trial_id"))
    best_cfg = trial_config(base, space, best_row["point"])
    best_cfg = from_dict({"train": {"run_name": f"{name}-best"}}, best_cfg)
    out = Path(best_out or Path(base.train.output_dir) / name / "best.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_yaml(best_cfg, out)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(f"\n{'trial':<12} {'epochs':>6} {'last ' + metric:>20} {'best epoch':>11}  point")
    for row in rows:
        last_s, best_s = ("error", "") if row["error"] else (fmt(row["last"]), fmt(row["best"]))
        flag = "  (stopped by ASHA)" if row["stopped_early"] else ("  (no result)" if row["last"] is None else "")
        print(f"{row['trial_id']!s:<12} {row['epochs']:>6} {last_s:>20} {best_s:>11}  {json.dumps(row['point'])}{flag}")
    print(
        f"\nbest trial: {best_row['trial_id']} (the {'highest' if mode == 'max' else 'lowest'} {metric} at its last "
        f"reported epoch, the rule of Tune's 'Current best trial', of ASHA and of Optuna): {metric} "
        f"{best_row['last']:.4f} after {best_row['epochs']} epochs; point {json.dumps(best_row['point'])}"
    )
    by_best_epoch = pick((row for row in rows if row["best"] is not None), key=lambda row: row["best"])
    if by_best_epoch["trial_id"] != best_row["trial_id"]:
        print(
            f"  (by each trial's best epoch instead, trial {by_best_epoch['trial_id']} would lead with {metric} "
            f"{by_best_epoch['best']:.4f}: its last epoch was not its best)"
        )
    print(f"best config: {out}\n  train it: rgnet train --config {out}")

    summary = {
        "metric": metric,
        "mode": mode,
        "rule": "last reported epoch (ResultGrid.get_best_result scope='last')",
        "trials": rows,
        "best": best_row,
        "best_config": str(out),
    }
    atomic_write_text(out.parent / "sweep.json", json.dumps(summary, indent=1, default=str))
    if parent is not None:
        log_sweep(parent, rows, best_row, metric, mode, out, space)
        print(
            f"  compare the trials: {tracking.ui_command(parent.uri)}, then "
            f"{tracking.run_url(parent.uri, parent.experiment_id, parent.run_id)}"
        )
    return summary


def log_sweep(
    parent: Any,
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    metric: str,
    mode: str,
    best_yaml: Path,
    space: SearchSpace,
) -> None:
    """The parent run's summary: the best point (params ``best.*``), its last value of the metric, the trial counts
    in the child runs' terms (FINISHED / KILLED = stopped early / FAILED), the best config and the sweep plots."""
    from mlflow.entities import Metric, Param

    from pipelines.tracking import metric_key

    client = parent.client()
    have = set(client.get_run(parent.run_id).data.params)
    params = [Param(f"best.{k}", json.dumps(v)[:6000]) for k, v in best["point"].items() if f"best.{k}" not in have]
    if params:
        client.log_batch(parent.run_id, params=params)
    import time

    ts = int(time.time() * 1000)
    client.log_batch(
        parent.run_id,
        metrics=[
            Metric(metric_key(f"best_{metric}"), float(best["last"]), ts, 0),
            Metric("trials_finished", float(sum(r["error"] is None and not r["stopped_early"] for r in rows)), ts, 0),
            Metric("trials_stopped_early", float(sum(r["stopped_early"] for r in rows)), ts, 0),
            Metric("trials_failed", float(sum(r["error"] is not None for r in rows)), ts, 0),
        ],
    )
    client.set_tag(parent.run_id, "rgnet.best_trial_id", str(best["trial_id"]))
    client.log_artifact(parent.run_id, str(best_yaml), "best")
    with tempfile.TemporaryDirectory() as tmp:
        for png in plot_sweep(rows, metric, mode, space, Path(tmp)):
            client.log_artifact(parent.run_id, str(png), "plots")


def plot_sweep(rows: list[dict[str, Any]], metric: str, mode: str, space: SearchSpace, out_dir: Path) -> list[Path]:
    """Optimization history (each trial's last value, the one Tune ranks by, and the best so far in ``mode``) and the
    metric against each swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["last"] is not None]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [r["last"] for r in done]
    ax.plot(range(1, len(values) + 1), values, "o", label="trial")
    pick = max if mode == "max" else min
    best_so_far = [pick(values[: i + 1]) for i in range(len(values))]
    ax.plot(range(1, len(values) + 1), best_so_far, "-", label="best so far")
    ax.set_xlabel("trial (in order of the results)")
    ax.set_ylabel(metric)
    ax.set_title("optimization history")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "optimization_history.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    keys = [*space.params, *([VARIANT_KEY] if space.variants else [])]
    for key in keys:
        xs = [r["point"].get(key) for r in done]
        fig, ax = plt.subplots(figsize=(6, 4))
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
            ax.plot(xs, values, "o")
            if key in space.params and space.params[key].kind == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.plot([labels.index(str(x)) for x in xs], values, "o")
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {key}")
        fig.tight_layout()
        paths.append(out_dir / f"metric_vs_{key.replace('.', '_')}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
