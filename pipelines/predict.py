"""``rgnet predict``: ground sentences in long videos with a trained model.

Two modes, one command:

* **One query** (``--video FEATURES[:KEY] --query "text" [--query-features F[:KEY]]``): the top-N moments in
  seconds with scores, printed as a table (``--json FILE|-`` for JSON), and with ``--plot-dir`` the query's timeline
  plot (window context scores and frame sampling scores over the whole video, the paper's Fig. 10).  Runs in this
  process; memory is bounded for any video length (:mod:`rgnet.predict`).
* **A whole split** (``--split val``): batch inference with Ray Data (:func:`pipelines.data.build_eval_dataset`).
  One row per video streams through a pool of actors that each hold the model (a GPU each when the cluster has
  GPUs); the driver writes the prediction JSON Lines as rows arrive, then the metric report and the plots (Recall@K
  vs K, retrieval Recall@K vs number of windows, a few query timelines) into ``--out``, and logs all of it to MLflow
  when tracking is on.

The model comes from ``--checkpoint FILE`` (``rgnet train`` writes ``runs/<name>/best.pt``) or ``--model-uri``
(``runs:/<run id>/model`` or ``models:/<name>/<version>`` from the MLflow store).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.common import SetupError, fail, setup_logging, split_name
from rgnet.config import Config, ConfigError, apply_overrides

log = logging.getLogger("rgnet.predict")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet predict",
        description="Top moments for a sentence in a long video (one query), or batch inference over a split on Ray.",
        epilog=(
            "Video features come from an external extractor at the model's rate: MAD presets expect CLIP ViT-B/32 "
            "frame features, (T, 512) at 5 fps; Ego4D presets EgoVLP features, (T, 256) at 1.875 fps. Query token "
            "features must come from the training extractor, unless the model was trained with "
            "data.text_encoder=minilm: then --query alone is enough."
        ),
    )
    m = p.add_argument_group("model (one of)")
    m.add_argument("--checkpoint", metavar="FILE", help="a checkpoint written by rgnet train (runs/NAME/best.pt)")
    m.add_argument("--model-uri", metavar="URI", help="an MLflow model: runs:/<run id>/model or models:/<name>/<ver>")
    m.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store for --model-uri and for logging (default: "
        "$MLFLOW_TRACKING_URI, else the model's tracking.uri)",
    )
    one = p.add_argument_group("one query")
    one.add_argument(
        "--video",
        metavar="FEATURES[:KEY]",
        help="video features: .h5 (KEY = dataset, e.g. a MAD movie "
        "id or videos/<id>), .pt (tensor, or dict with KEY) or .npy, shape (T, video_dim)",
    )
    one.add_argument("--query", metavar="TEXT", help="the sentence (encoded by the model's text encoder if it has one)")
    one.add_argument("--query-features", metavar="F[:KEY]", help="precomputed query token features (L, text_dim)")
    one.add_argument(
        "--queries",
        metavar="FILE",
        help='many queries about the --video, JSON Lines: one {"id": ..., "query": "a sentence"} or {"id": ..., '
        '"query_features": "FEATURES.h5:KEY"} per line; the video is read and projected once and the queries\' '
        "(query, window) pairs are batched; the answers are JSON Lines (--json FILE|-), one object per query",
    )
    one.add_argument(
        "--sentence-features",
        metavar="F[:KEY]",
        help="sentence feature (1, video_dim) for frozen-feature ranking models (model.retrieval=none)",
    )
    one.add_argument("--fps", type=float, help="feature rate (default: the file's fps attribute, else the model's)")
    one.add_argument("--top", type=int, default=10, help="moments to return (default: %(default)s)")
    one.add_argument(
        "--json",
        metavar="FILE",
        help="write the answer as JSON to FILE ('-': print JSON, no table); with --queries, JSON Lines",
    )
    one.add_argument("--plot-dir", metavar="DIR", help="write the query's timeline plot (PNG) here")
    batch = p.add_argument_group("a whole split (Ray Data batch inference)")
    batch.add_argument("--split", help="train, val, test or a split name of the model's dataset")
    batch.add_argument("--out", metavar="DIR", help="output folder (default: predictions/<run name>-<split>)")
    batch.add_argument("--concurrency", type=int, default=0, help="model actors (default: one per GPU, else CPUs - 1)")
    batch.add_argument("--timelines", type=int, default=3, help="timeline plots for the split's first N queries")
    batch.add_argument("--no-tracking", action="store_true", help="do not log to MLflow even if the config says so")
    p.add_argument("--smoke-test", action="store_true", help="tiny preset model, untrained, on its val split")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (eval.*, data.root and file names; model.* is fixed by the checkpoint)",
    )
    return p


# ---------------------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------------------
def load_payload(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from pipelines.runtime import load_model_uri
    from rgnet.train.checkpoint import load_checkpoint

    if bool(args.checkpoint) == bool(args.model_uri):
        raise ConfigError("give exactly one of --checkpoint FILE or --model-uri URI")
    if args.checkpoint:
        return load_checkpoint(args.checkpoint), str(args.checkpoint)
    return load_model_uri(args.model_uri, args.tracking_uri), str(args.model_uri)


def smoke_payload() -> dict[str, Any]:
    """An untrained tiny-preset model and its (generated) dataset: exercises the whole path in seconds."""
    from pipelines.runtime import resolve_paths
    from rgnet.config import load_config
    from rgnet.data.synthetic import ensure_configured_dataset
    from rgnet.model import build_model
    from rgnet.train.checkpoint import make_payload
    from rgnet.train.loop import seed_everything

    cfg = resolve_paths(load_config("tiny", None, []))
    ensure_configured_dataset(cfg.data)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    return make_payload(model, cfg, epoch=0, global_step=0)


# ---------------------------------------------------------------------------------------------------------------
# One query
# ---------------------------------------------------------------------------------------------------------------
def predict_one(args: argparse.Namespace, model: Any, cfg: Config) -> dict[str, Any]:
    from rgnet.io import atomic_write_json
    from rgnet.train.loop import resolve_device

    if args.query is not None and not args.query.strip():
        raise ValueError("the query is empty: give a sentence with --query")
    if args.query is None and not args.query_features:
        raise ValueError("give the sentence with --query (and --query-features for models without a text encoder)")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    from rgnet.predict import format_answer, ground, query_inputs, timeline_plot

    inputs = query_inputs(
        model,
        cfg,
        video=args.video,
        query=args.query,
        query_features=args.query_features or None,
        sentence_features=args.sentence_features or None,
        fps=args.fps,
    )
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    answer = ground(
        model.to(device), cfg, **inputs, top_n=args.top, device=device, keep_sampling_scores=bool(args.plot_dir)
    )
    elapsed = time.perf_counter() - t0
    out = answer.to_json()
    out["seconds"] = round(elapsed, 3)
    if args.plot_dir:
        out["plot"] = str(timeline_plot(answer, Path(args.plot_dir), cfg.eval.top_k_windows))
    if args.json == "-":
        print(json.dumps(out, indent=2))
    else:
        print(format_answer(answer))
        print(f"({len(answer.windows)} windows, {elapsed:.2f} s)")
        if args.json:
            atomic_write_json(args.json, out)
            print(f"JSON written to {args.json}")
        if args.plot_dir:
            print(f"timeline plot: {out['plot']}")
    return out


def predict_many(args: argparse.Namespace, model: Any, cfg: Config) -> list[dict[str, Any]]:
    """``--queries FILE``: every query of the file on the one ``--video``; JSON Lines out (``--json``), one object per
    query: its ``id`` and the fields ``--json`` writes for one query (``seconds``: the batch's time per query)."""
    from rgnet.io import atomic_open
    from rgnet.predict import (
        feature_input,
        format_answer,
        ground_many,
        needs_sentence,
        read_queries,
        resolve_fps,
        timeline_plot,
    )
    from rgnet.train.loop import resolve_device

    if args.query is not None or args.query_features or args.sentence_features:
        raise ValueError("--queries FILE holds the queries: drop --query, --query-features and --sentence-features")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    lines = read_queries(args.queries, cfg.data, sentence_needed=needs_sentence(model, cfg.eval))
    frames, key, stored_fps = feature_input(args.video, kind="video", dim=cfg.data.video_dim)
    fps = resolve_fps(cfg.data, args.fps, stored_fps, args.video)
    video = key.rsplit("/", 1)[-1]
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    answers = ground_many(
        model.to(device),
        cfg,
        frames,
        fps,
        [q.tokens for q in lines],
        video=video,
        queries=[q.query for q in lines],
        sentences=None if any(q.sentence is None for q in lines) else [q.sentence for q in lines],  # type: ignore[misc]
        top_n=args.top,
        device=device,
        keep_sampling_scores=bool(args.plot_dir),
    )
    elapsed = time.perf_counter() - t0
    outs = []
    for q, answer in zip(lines, answers):
        out = {"id": q.id, **answer.to_json(), "seconds": round(elapsed / len(lines), 3)}
        if args.plot_dir:
            out["plot"] = str(
                timeline_plot(answer, Path(args.plot_dir), cfg.eval.top_k_windows, name=f"{video}_{q.id}")
            )
        outs.append(out)
    if args.json == "-":
        for out in outs:
            print(json.dumps(out))
        return outs
    for q, answer in zip(lines, answers):
        print(f"[{q.id}] " + format_answer(answer))
    print(f"({len(lines)} queries, {len(answers[0].windows)} windows, {elapsed:.2f} s)")
    if args.json:
        with atomic_open(args.json) as fh:
            for out in outs:
                fh.write(json.dumps(out) + "\n")
        print(f"JSON Lines written to {args.json}")
    return outs


# ---------------------------------------------------------------------------------------------------------------
# A whole split on Ray Data
# ---------------------------------------------------------------------------------------------------------------
def _actor_resources(requested: int, num_videos: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus > 0:
        n = requested or gpus
        return max(1, min(n, num_videos)), 1.0, 1.0
    cpus = int(res.get("CPU", 1))
    n = requested or max(1, cpus - 1)  # leave a CPU for the read tasks and the driver
    return max(1, min(n, num_videos)), 1.0, 0.0


def predict_split(args: argparse.Namespace, payload: dict[str, Any], cfg: Config, source: str) -> dict[str, Any]:
    from pipelines import tracking
    from pipelines.data import build_eval_dataset, video_table
    from pipelines.runtime import init_ray, tracked_run
    from rgnet.data.dataset import open_split
    from rgnet.eval.metrics import evaluate_with, format_table
    from rgnet.eval.plots import draw_timeline, recall_vs_k, retrieval_vs_windows
    from rgnet.eval.predictions import PredictionRow, compact_row, parse_row
    from rgnet.io import atomic_open, atomic_write_json

    split = split_name(cfg, args.split)
    data = open_split(cfg.data, split)  # fails here, before Ray starts, on a missing or malformed split
    records, videos = data.records, video_table(data)
    data_input = tracking.dataset_input(data, split) if cfg.tracking.enabled and not args.no_tracking else None
    data.close()
    out_dir = Path(args.out or f"predictions/{cfg.train.run_name}-{split}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    timeline_ids = [r.query_id for r in records[: max(0, args.timelines)]]

    handle = None
    if cfg.tracking.enabled and not args.no_tracking:
        if args.tracking_uri:
            cfg = apply_overrides(cfg, [f"tracking.uri={args.tracking_uri}"])
        handle = tracking.open_run(
            cfg,
            run_key=f"predict:{source}:{split}",
            tags={"rgnet.job": "predict", "rgnet.model": source},
            command="rgnet predict",
        )
        handle.client().log_inputs(handle.run_id, datasets=[data_input])

    with tracked_run(handle) as run:  # marks the MLflow run and shuts Ray down, however the block ends
        run.connected = init_ray(cfg)
        actors, cpus, gpus = _actor_resources(args.concurrency, len(videos))
        ds = build_eval_dataset(
            payload,
            list(args.overrides),
            split,
            videos,
            actors=actors,
            cpus=cpus,
            gpus=gpus,
            timeline_ids=timeline_ids,
        )
        log.info(
            "predicting %d queries of %d videos on %d actor(s) (%s each)",
            len(records),
            len(videos),
            actors,
            "1 GPU" if gpus else f"{cpus:g} CPU",
        )
        rows: list[PredictionRow] = []
        timelines: list[dict[str, Any]] = []
        pred_path = out_dir / "predictions.jsonl"
        t0 = time.perf_counter()
        with atomic_open(pred_path) as fh:
            for n, out in enumerate(_rows(ds), 1):
                fh.write(out["row"] + "\n")
                row = parse_row(json.loads(out["row"]), pred_path, n)
                rows.append(compact_row(row))
                if out["timeline"]:
                    timelines.append(json.loads(out["timeline"]))
                if n % 200 == 0:
                    log.info("%d/%d queries", n, len(records))
        elapsed = time.perf_counter() - t0
        report = evaluate_with(rows, records, cfg.eval, f"{split} predictions")
        report.update({"split": split, "model": source, "seconds": round(elapsed, 2), "actors": actors})
        atomic_write_json(out_dir / "report.json", report)
        plots_dir = out_dir / "plots"
        plots_dir.mkdir(exist_ok=True)
        plots = [
            recall_vs_k(
                plots_dir / "recall_vs_k.png",
                rows,
                records,
                profile=cfg.eval.profile,
                iou_thresholds=cfg.eval.iou_thresholds,
            ),
            retrieval_vs_windows(plots_dir / "retrieval_vs_windows.png", rows, records),
        ]
        for t in timelines:
            plots.append(
                draw_timeline(
                    plots_dir,
                    t["query_id"],
                    fps=t["fps"],
                    bounds=np.asarray(t["bounds"], dtype=np.int64),
                    frame_scores=np.array([np.nan if v is None else v for v in t["frame_scores"]], dtype=np.float64),
                    top_k_windows=cfg.eval.top_k_windows,
                    duration_sec=t["duration_sec"],
                    context_logit=np.asarray(t["context_logit"]),
                    gt=tuple(t["gt"]),
                    predictions=t["predictions"],
                    query=t["query"],
                )
            )
        print(format_table(report))
        print(
            f"{len(rows)} queries in {elapsed:.1f} s on {actors} actor(s); predictions {pred_path}, report "
            f"{out_dir / 'report.json'}, plots {plots_dir}"
        )
        if handle is not None:
            client = handle.client()
            for name, value in report["metrics"].items():
                client.log_metric(handle.run_id, tracking.metric_key(f"{split}/{name}"), float(value))
            for path in (pred_path, out_dir / "report.json"):
                client.log_artifact(handle.run_id, str(path))
            for png in plots:
                client.log_artifact(handle.run_id, str(png), "plots")
            print(f"MLflow run {handle.run_id}: {tracking.ui_command(handle.uri)}")
        return report


def _rows(ds: Any) -> Iterator[dict[str, str]]:
    for row in ds.iter_rows():
        yield {"row": str(row["row"]), "timeline": str(row["timeline"] or "")}


# ---------------------------------------------------------------------------------------------------------------
def _main(args: argparse.Namespace) -> int:
    from rgnet.text import TextEncoderUnavailable
    from rgnet.train import checkpoint as ckpt

    if args.video and args.split:
        return fail("give --video (one query) or --split (batch inference), not both")
    try:
        if args.smoke_test and not (args.checkpoint or args.model_uri):
            payload, source = smoke_payload(), "smoke-test (untrained tiny model)"
            if not args.video and not args.split:
                args.split = "val"
        else:
            payload, source = load_payload(args)
        model, cfg = ckpt.model_with_overrides(payload, args.overrides)
        if args.split:
            predict_split(args, payload, cfg, source)
        elif args.video and args.queries:
            predict_many(args, model, cfg)
        elif args.video:
            predict_one(args, model, cfg)
        else:
            return fail("give --video FEATURES[:KEY] with --query/--query-features or --queries FILE, or --split NAME")
    # ValueError: ConfigError, DataError, and bad arguments found by the library (empty query, ...)
    except (SetupError, FileNotFoundError, TextEncoderUnavailable, ValueError) as e:
        return fail(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return _main(args)


if __name__ == "__main__":
    sys.exit(main())
