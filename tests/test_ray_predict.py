"""Batch inference over a split with Ray Data (`rgnet predict --split`): same metrics as the local evaluator, the
prediction file, the plots, and the MLflow run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import predict as predict_cli
from pipelines.runtime import resolve_paths
from rgnet.config import load_config
from rgnet.data.dataset import open_split
from rgnet.data.synthetic import ensure_configured_dataset
from rgnet.eval.plots import CURVE_SIZE_PX, TIMELINE_SIZE_PX
from rgnet.eval.predictions import read_predictions
from rgnet.model import build_model
from rgnet.train.checkpoint import make_payload, save_checkpoint
from rgnet.train.loop import evaluate_model, seed_everything

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@pytest.mark.timeout(400)
def test_batch_predict_equals_the_local_evaluator(ray_session: str, tmp_path: Path) -> None:
    cfg = resolve_paths(
        load_config(
            "tiny",
            overrides=[
                f"data.root={tmp_path / 'data'}",
                f"train.output_dir={tmp_path / 'runs'}",
                "train.progress=false",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
        )
    )
    ensure_configured_dataset(cfg.data)
    seed_everything(3)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    ckpt = save_checkpoint(make_payload(model, cfg, epoch=0, global_step=0), tmp_path / "m.pt")
    out = tmp_path / "pred"

    rc = predict_cli.main(["--checkpoint", str(ckpt), "--split", "val", "--out", str(out), "--timelines", "2"])
    assert rc == 0

    val = open_split(cfg.data, "val")
    local, local_rows = evaluate_model(model, val, cfg.windows, cfg.eval, torch.device("cpu"))
    report = json.loads((out / "report.json").read_text())
    assert report["num_queries"] == len(val.records) == 32
    assert report["metrics"] == local["metrics"]  # same checkpoint, same numbers
    assert report["metrics"]["retrieval_R5"] > 0  # not a vacuous comparison
    rows = read_predictions(out / "predictions.jsonl")
    assert sorted(r.query_id for r in rows) == sorted(r.query_id for r in val.records)
    by_id = {r.query_id: r for r in local_rows}
    for row in rows:
        np.testing.assert_allclose(row.predictions, by_id[row.query_id].predictions, atol=1e-5)

    plots = out / "plots"
    assert png_size(plots / "recall_vs_k.png") == CURVE_SIZE_PX
    assert png_size(plots / "retrieval_vs_windows.png") == CURVE_SIZE_PX
    timelines = sorted(plots.glob("timeline_*.png"))
    assert [p.name for p in timelines] == sorted(f"timeline_{r.query_id}.png" for r in val.records[:2])
    assert all(png_size(p) == TIMELINE_SIZE_PX for p in timelines)

    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("rgnet.job") == "predict"]
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.source.name"] == "rgnet predict"
    assert [(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs] == [("data/val", "val")]
    assert run.data.metrics["val/R1_at_0.3"] == pytest.approx(report["metrics"]["R1@0.3"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/recall_vs_k.png", "plots/retrieval_vs_windows.png"} <= logged
