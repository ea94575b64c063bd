"""The metrics ``rgnet evaluate`` prints (this module imports no command module): of a prediction file against an
annotation file (:func:`evaluate_prediction_file`, with the submission exports), or of a checkpoint on a split of its
dataset (:func:`evaluate_checkpoint`, also what ``rgnet study`` tabulates).

The model of a checkpoint evaluation is a checkpoint file or an MLflow model URI (``runs:/<run_id>/model``,
``models:/<name>/<version>``); the metrics follow the checkpoint's config (``eval.*``) with the given overrides, which
cannot change ``model.*``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.common import split_name
from rgnet.config import ConfigError, DataConfig, EvalConfig, Layout, Profile

log = logging.getLogger("rgnet.evaluate")


@dataclass(frozen=True)
class PredictionFileOptions:
    """A prediction file (JSON Lines), the annotation file it is scored against (its layout, MAD's ground-truth
    field, whether zero-length moments count), the metric settings, and the submission files to write."""

    predictions: str
    annotations: str | None
    layout: Layout = DataConfig().layout
    mad_gt_field: str = DataConfig().mad_gt_field
    keep_zero_length: bool = False
    profile: Profile = EvalConfig().profile
    recall_ks: tuple[int, ...] = tuple(EvalConfig().recall_ks)
    iou_thresholds: tuple[float, ...] = tuple(EvalConfig().iou_thresholds)
    retrieval_ks: tuple[int, ...] = tuple(EvalConfig().retrieval_ks)
    max_predictions: int | None = None
    export_ego4d: str | None = None
    export_moment_detr: str | None = None
    export_cone_mad: str | None = None


def evaluate_checkpoint(
    *,
    checkpoint: str | None = None,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    split: str = "val",
    overrides: Sequence[str] = (),
    predictions_out: str | None = None,
) -> dict[str, Any]:
    """Two-stage inference of a checkpoint (a file, else an MLflow ``model_uri``) on ``split`` (train, val, test or
    a split name) of its dataset; returns the metric report (with the checkpoint, its epoch and the split) and writes
    the predictions to ``predictions_out`` when given."""
    from pipelines.runtime import load_model_uri
    from rgnet.config import apply_overrides
    from rgnet.data.dataset import open_split
    from rgnet.eval.predictions import write_predictions
    from rgnet.train.checkpoint import load_checkpoint, model_from_payload
    from rgnet.train.loop import evaluate_model, resolve_device

    if bool(checkpoint) == bool(model_uri):
        raise ConfigError("give one of a checkpoint file or an MLflow model URI")
    payload = load_checkpoint(checkpoint) if checkpoint else load_model_uri(str(model_uri), tracking_uri)
    model, cfg = model_from_payload(payload)
    new_cfg = apply_overrides(cfg, list(overrides))
    if new_cfg.model != cfg.model:
        raise ConfigError("overrides cannot change model.* keys of a trained checkpoint")
    cfg = new_cfg
    split = split_name(cfg, split)
    device = resolve_device(cfg.train.device)
    data = open_split(cfg.data, split)
    report, rows = evaluate_model(model.to(device), data, cfg.windows, cfg.eval, device, progress=cfg.train.progress)
    report["checkpoint"] = str(checkpoint or model_uri)
    report["checkpoint_epoch"] = int(payload["epoch"])
    report["split"] = split
    if predictions_out:
        write_predictions(predictions_out, rows)
    return report


def _check_metric_args(opts: PredictionFileOptions) -> None:
    if not opts.annotations:
        raise ConfigError("--predictions needs --annotations FILE (the ground truth to score against)")
    if any(k < 1 for k in [*opts.recall_ks, *opts.retrieval_ks]):
        raise ConfigError(f"--recall-ks and --retrieval-ks must be >= 1, got {opts.recall_ks} / {opts.retrieval_ks}")
    if any(not 0 <= m < 1 for m in opts.iou_thresholds):
        raise ConfigError(f"--iou thresholds must lie in [0, 1), got {opts.iou_thresholds}")
    if opts.max_predictions is not None and opts.max_predictions < 1:
        raise ConfigError(f"--max-predictions must be >= 1, got {opts.max_predictions}")


def evaluate_prediction_file(opts: PredictionFileOptions) -> dict[str, Any]:
    """Read, check and score a prediction file; write the requested exports. Returns the metric report."""
    _check_metric_args(opts)
    from rgnet.data.dataset import read_annotations
    from rgnet.eval.metrics import evaluate_with
    from rgnet.eval.predictions import read_predictions, write_cone_mad, write_ego4d_challenge, write_moment_detr

    rows = read_predictions(opts.predictions)
    # Read every record and drop zero-length moments here rather than in the reader: a prediction file made on the
    # full split still has rows for them, which must be set aside (and counted), not reported as unknown queries.
    all_records, _ = read_annotations(  # the reader logs what it skipped
        opts.layout, str(opts.annotations), mad_gt_field=opts.mad_gt_field, drop_zero_length=False
    )
    records, kept_rows = list(all_records), rows
    zero_ids: set[str] = set()
    if not opts.keep_zero_length:
        zero_ids = {r.query_id for r in all_records if r.end_sec == r.start_sec}  # as the reader's flag
        records = [r for r in all_records if r.query_id not in zero_ids]
        kept_rows = [r for r in rows if r.query_id not in zero_ids]
        if zero_ids:
            log.warning(
                "dropped %d zero-length ground-truth moments (and %d prediction rows for them); "
                "--keep-zero-length scores them",
                len(zero_ids),
                len(rows) - len(kept_rows),
            )

    report = evaluate_with(kept_rows, records, opts, source=str(opts.predictions))
    report["predictions_file"] = str(opts.predictions)
    report["annotations_file"] = str(opts.annotations)
    report["layout"] = opts.layout
    report["num_zero_length_dropped"] = len(zero_ids)

    # Exports hold one entry per record of the file, zero-length ones included (a challenge server scores them too),
    # capped as the metrics were: what is submitted is what was scored here.
    exports = (
        (opts.export_ego4d, write_ego4d_challenge, "the Ego4D challenge submission"),
        (opts.export_moment_detr, write_moment_detr, "the Moment-DETR submission"),
        (opts.export_cone_mad, write_cone_mad, "CONE's MAD submission"),
    )
    for path, write, what in exports:
        if path:
            write(path, rows, all_records, max_predictions=opts.max_predictions, source=opts.predictions)
            log.info("wrote %s to %s", what, path)
    return report
