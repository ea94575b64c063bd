"""``rgnet evaluate`` / ``python -m pipelines.evaluate``: metrics for a prediction file (and submission exports).

Prediction-file mode scores a JSON Lines prediction file (``rgnet.eval.predictions``) against a dataset's
annotations under a named metric profile, prints a table, and optionally writes the JSON report and the Ego4D
challenge / Moment-DETR / CONE MAD submission files (one entry per ground-truth query, capped at --max-predictions)::

    rgnet evaluate --predictions runs/x/predictions_val.jsonl --annotations data/nlq_val.json --layout ego4d \\
        --profile rgnet --out report.json --export-ego4d submission.json

Checkpoint mode runs two-stage inference with a trained model on a split of its dataset, then the same metrics;
the model is a checkpoint file (``--checkpoint runs/NAME/best.pt``) or the best model a distributed run logged to
MLflow (``--model-uri runs:/<run_id>/model`` or ``models:/<name>/<version>``, with ``--tracking-uri``).

Each mode is one function returning the report (``pipelines.evaluation.evaluate_prediction_file`` and
``evaluate_checkpoint``); ``main`` only parses, dispatches and prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import get_args

from pipelines.common import fail, remove_flags, run_command
from pipelines.evaluation import PredictionFileOptions, evaluate_checkpoint, evaluate_prediction_file
from rgnet.config import DataConfig, EvalConfig, Layout, Profile


def build_parser() -> argparse.ArgumentParser:
    ev, data = EvalConfig(), DataConfig()
    p = argparse.ArgumentParser(
        prog="rgnet evaluate",
        description=(
            "Recall@K at IoU thresholds, mIoU and window-retrieval recall for a prediction file or a checkpoint."
        ),
    )
    src = p.add_argument_group("prediction-file mode")
    src.add_argument(
        "--predictions",
        metavar="FILE",
        help="prediction file (JSON Lines rows {query_id, video_id, predictions, [windows]})",
    )
    src.add_argument(
        "--annotations",
        metavar="FILE",
        help="ground-truth annotation file (MAD_*.json, nlq_*.json, or native .jsonl/.parquet)",
    )
    src.add_argument(
        "--layout",
        choices=get_args(Layout),
        default=data.layout,
        help=f"layout of the annotation file (default: {data.layout})",
    )
    src.add_argument(
        "--mad-gt-field",
        choices=("timestamps", "ext_timestamps"),
        default=data.mad_gt_field,
        help=f"MAD only: which annotation field is the ground truth (default: {data.mad_gt_field})",
    )
    src.add_argument(
        "--keep-zero-length",
        action="store_true",
        help="keep zero-length ground-truth moments (default: drop them, with their predictions, and "
        "count them in the log, as training does)",
    )

    ck = p.add_argument_group("checkpoint mode (two-stage inference with a trained model, then the same metrics)")
    ck.add_argument("--checkpoint", metavar="FILE", help="a checkpoint written by rgnet train (e.g. runs/NAME/best.pt)")
    ck.add_argument(
        "--model-uri",
        metavar="URI",
        help="instead of --checkpoint: the best model an `rgnet train` run logged to MLflow, runs:/<run_id>/model or "
        "models:/<name>/<version> (printed at the end of training)",
    )
    ck.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI for --model-uri (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<absolute cwd>/mlflow.db, the default of rgnet train)",
    )
    ck.add_argument(
        "--split", default="val", help="which split of the checkpoint's dataset: train, val or test (default: val)"
    )
    ck.add_argument("--predictions-out", metavar="FILE", help="also write the predictions (JSON Lines)")
    ck.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="checkpoint mode: config overrides on top of the checkpoint's config, e.g. eval.top_k_windows=10 "
        "data.root=/other/copy (model keys cannot change)",
    )
    remove_flags(p, {"--set": "give the overrides as positional key=value (e.g. eval.top_k_windows=10)"})

    met = p.add_argument_group("metrics")
    met.add_argument(
        "--profile",
        choices=get_args(Profile),
        default=ev.profile,
        help=f"IoU rule: rgnet = IoU > m (RGNet/CONE/Ego4D), geq = IoU >= m (MAD/VLG-Net, SOONet, "
        f"Moment-DETR) (default: {ev.profile})",
    )
    for flag, kind, default, metavar, text in (
        ("--recall-ks", int, ev.recall_ks, "K", "K of Recall@K"),
        ("--iou", float, ev.iou_thresholds, "M", "IoU thresholds m (MAD adds 0.1)"),
        ("--retrieval-ks", int, ev.retrieval_ks, "K", "K of window-retrieval Recall@K, when rows carry ranked windows"),
    ):
        met.add_argument(
            flag,
            type=kind,
            nargs="+",
            default=list(default),
            metavar=metavar,
            help=f"{text} (default: {' '.join(map(str, default))})",
        )
    met.add_argument(
        "--max-predictions",
        type=int,
        default=None,
        metavar="N",
        help="use at most the first N predictions per query (default: all in the file)",
    )

    out = p.add_argument_group("outputs")
    out.add_argument("--out", metavar="FILE", help="write the JSON report here (atomically)")
    out.add_argument(
        "--export-ego4d",
        metavar="FILE",
        help="also write the Ego4D NLQ challenge submission JSON (for evaluate_ego4d_nlq.py and the challenge server)",
    )
    out.add_argument(
        "--export-moment-detr",
        metavar="FILE",
        help="also write the Moment-DETR submission (JSON Lines with pred_relevant_windows, for its "
        "standalone_eval/eval.py)",
    )
    out.add_argument(
        "--export-cone-mad",
        metavar="FILE",
        help="also write CONE's MAD submission (JSON Lines with predicted_times, for standalone_eval/evaluate_mad.py)",
    )
    p.epilog = (
        "Exports hold one entry per ground-truth query of --annotations, in the file's order (zero-length moments "
        "included), at most --max-predictions predictions each; a query without predictions gets a zero-length "
        "placeholder [0, 0, 0] (IoU 0), counted in a warning."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(args: argparse.Namespace) -> int:
    from rgnet.eval.metrics import format_table
    from rgnet.io import atomic_write_json

    if sum(bool(x) for x in (args.predictions, args.checkpoint, args.model_uri)) > 1:
        return fail("give one of --predictions (with --annotations), --checkpoint or --model-uri")
    if args.predictions:
        if args.overrides:
            return fail(f"key=value overrides ({' '.join(args.overrides)}) apply to a checkpoint, not to --predictions")
        report = evaluate_prediction_file(
            PredictionFileOptions(
                predictions=args.predictions,
                annotations=args.annotations,
                layout=args.layout,
                mad_gt_field=args.mad_gt_field,
                keep_zero_length=args.keep_zero_length,
                profile=args.profile,
                recall_ks=tuple(args.recall_ks),
                iou_thresholds=tuple(args.iou),
                retrieval_ks=tuple(args.retrieval_ks),
                max_predictions=args.max_predictions,
                export_ego4d=args.export_ego4d,
                export_moment_detr=args.export_moment_detr,
                export_cone_mad=args.export_cone_mad,
            )
        )
    elif args.checkpoint or args.model_uri:
        report = evaluate_checkpoint(
            checkpoint=args.checkpoint,
            model_uri=args.model_uri,
            tracking_uri=args.tracking_uri,
            split=args.split,
            overrides=args.overrides,
            predictions_out=args.predictions_out,
        )
    else:
        return fail(
            "give --predictions FILE --annotations FILE, --checkpoint FILE or --model-uri URI "
            "(see rgnet evaluate --help)"
        )
    print(format_table(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
