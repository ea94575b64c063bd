"""The CUDA paths: a bf16 autocast training step, `rgnet train` with one Ray Train worker on a GPU, batch
prediction (`rgnet predict --split`) on a GPU actor, and the `rgnet bench` inference rows in bf16.  Marked ``gpu``:
the README's test command (``-m "not gpu"``) deselects them, and ``python -m pytest -m gpu`` runs them on a machine
with CUDA.  Selected on a machine without CUDA they fail and say so, rather than skip: selecting them means you
wanted them run.

The reference machine has no GPU, so these were written by reading the code paths (rgnet.train.loop.train_step and
autocast_context; pipelines.trainer.train_on_ray with ray.use_gpu and pipelines.train_worker; pipelines.predict's actor
resources and pipelines.data.VideoPredictor; pipelines.bench.bench_infer) and have not run here.
``test_cpu_step_helper_runs_fp32`` (not marked) runs the step helper of the first test on the CPU everywhere, so
that helper keeps up with the training code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.runtime import resolve_paths
from rgnet.config import Config, load_config
from rgnet.data.dataset import open_split
from rgnet.data.samples import TrainBatches
from rgnet.data.synthetic import ensure_configured_dataset
from rgnet.model import Criterion, build_model
from rgnet.train.loop import build_optimizer, build_scheduler, resolve_device, seed_everything, train_step


@pytest.fixture(scope="session")  # session scope: it runs before (and instead of) starting the session's Ray
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail(
            f"the gpu tests need CUDA, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda}); run them on a machine with a GPU and a CUDA build of torch, or "
            "deselect them with -m 'not gpu'",
            pytrace=False,
        )
    return torch.device("cuda")


def tiny(tmp: Path, *extra: str) -> Config:
    return resolve_paths(
        load_config(
            "tiny",
            overrides=[
                f"data.root={tmp / 'data'}",
                f"train.output_dir={tmp / 'runs'}",
                f"ray.storage_path={tmp / 'ray_results'}",
                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                "train.progress=false",
                *extra,
            ],
        )
    )


def one_step(cfg: Config) -> tuple[dict[str, float], set[torch.dtype], nn.Module, dict[str, torch.Tensor]]:
    """One train_step on the first batch of the tiny training split, on ``cfg.train.device``: the losses, the output
    dtypes of every nn.Linear during the step, the model, and its weights before the step."""
    ensure_configured_dataset(cfg.data)
    data = open_split(cfg.data, cfg.data.train_split)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).to(device)
    criterion = Criterion(cfg.loss).to(device)
    batches = TrainBatches(data, windows=cfg.windows, train=cfg.train, loss=cfg.loss)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, batches.num_batches())
    # as fit() builds it: loss scaling only for fp16 (bf16 has fp32's exponent range)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.precision == "fp16")
    dtypes: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(batches.epoch(0)))
    try:
        losses = train_step(model, criterion, batch, optimizer, scheduler, cfg, device, scaler)
    finally:
        for h in hooks:
            h.remove()
        data.close()
    return losses, dtypes, model, before


def _check_step(losses: dict[str, float], model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert all(math.isfinite(v) for v in losses.values()) and losses["loss"] > 0, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32 (autocast casts copies)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "the step did not update any weight"


def test_cpu_step_helper_runs_fp32(tmp_path: Path) -> None:
    """On the CPU, train.precision=bf16 changes nothing: autocast is CUDA-only here ("CPU always runs fp32")."""
    losses, dtypes, model, before = one_step(tiny(tmp_path, "train.device=cpu", "train.precision=bf16"))
    assert dtypes == {torch.float32}
    _check_step(losses, model, before)


@pytest.mark.gpu
def test_bf16_autocast_train_step(cuda: torch.device, tmp_path: Path) -> None:
    losses, dtypes, model, before = one_step(tiny(tmp_path, "train.device=cuda", "train.precision=bf16"))
    assert torch.bfloat16 in dtypes, dtypes  # the linear layers ran in bf16 under autocast
    assert all(p.device.type == "cuda" for p in model.parameters())
    _check_step(losses, model, before)


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_one_gpu_worker(cuda: torch.device, ray_session: str, tmp_path: Path) -> None:
    """`rgnet train --smoke-test ray.use_gpu=true ray.num_workers=1 train.precision=bf16`: the worker actor holds a
    GPU (Ray then hands it cuda:0 from ray.train.torch.get_device), trains with autocast, and the run finishes."""
    import ray
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    from pipelines import train as train_cli

    assert ray.cluster_resources().get("GPU", 0) >= 1, "the session's Ray sees no GPU"
    cfg = tiny(tmp_path)
    workers = [("class_name", "=", "RayTrainWorker")]
    before = {a.actor_id for a in list_actors(address=ray_session, filters=workers, limit=10_000)}
    argv = [
        "--smoke-test", "--no-test", f"tracking.uri={cfg.tracking.uri}", f"data.root={cfg.data.root}",
        f"train.output_dir={cfg.train.output_dir}", f"ray.storage_path={cfg.ray.storage_path}", "train.progress=false",
        "ray.use_gpu=true", "ray.num_workers=1", "ray.gpus_per_worker=1", "train.precision=bf16",
    ]  # fmt: skip
    assert train_cli.main(argv) == 0

    new = [
        a
        for a in list_actors(address=ray_session, filters=workers, detail=True, limit=10_000)
        if a.actor_id not in before
    ]
    assert new, "no Ray Train worker ran"
    assert all((a.required_resources or {}).get("GPU") == 1 for a in new), [a.required_resources for a in new]
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["ray.use_gpu"] == "True" and run.data.params["train.precision"] == "bf16"
    history = json.loads((Path(cfg.train.output_dir) / "tiny-smoke" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["train/loss"]) for h in history)


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_batch_predict_on_a_gpu_actor(
    cuda: torch.device, ray_session: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`rgnet predict --split val` on a Ray with a GPU: one actor holding the GPU (the driver says so), every query
    predicted, and the numbers of the local evaluator on the same GPU."""
    import logging

    from pipelines import predict as predict_cli
    from rgnet.eval.predictions import read_predictions
    from rgnet.train.checkpoint import make_payload, save_checkpoint
    from rgnet.train.loop import evaluate_model

    cfg = tiny(tmp_path)
    ensure_configured_dataset(cfg.data)
    seed_everything(3)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    ckpt = save_checkpoint(make_payload(model, cfg, epoch=0, global_step=0), tmp_path / "m.pt")
    out = tmp_path / "pred"
    with caplog.at_level(logging.INFO, logger="rgnet.predict"):
        rc = predict_cli.main(["--checkpoint", str(ckpt), "--split", "val", "--out", str(out), "--no-tracking"])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("actor(s) (1 GPU each)" in m for m in said), said

    val = open_split(cfg.data, "val")
    local, local_rows = evaluate_model(model.to(cuda), val, cfg.windows, cfg.eval, cuda)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert report["num_queries"] == len(val.records)
    rows = read_predictions(out / "predictions.jsonl")
    assert sorted(r.query_id for r in rows) == sorted(r.query_id for r in val.records)
    by_id = {r.query_id: r for r in local_rows}
    for row in rows:  # the same model on the same kind of device: the same moments, up to reduction order
        np.testing.assert_allclose(row.predictions, by_id[row.query_id].predictions, atol=1e-3)
    one_query = 100 / len(val.records)  # a score tie broken the other way moves a recall by one query at most
    for key, value in local["metrics"].items():
        assert report["metrics"][key] == pytest.approx(value, abs=one_query + 1e-9), key


@pytest.mark.gpu
def test_bench_inference_on_cuda_in_bf16(cuda: torch.device) -> None:
    """`rgnet bench train.device=cuda train.precision=bf16`: the inference rows under bf16 autocast
    (pipelines.bench.bench_infer on the eager model: the fused copy is CPU-only), GPU peak memory, the floor at the
    bf16 matmul peak."""
    from pipelines import bench

    tiny = ["--preset", "tiny", "--feature-dim", "32", "--peak-seconds", "0.2", "--queries", "1", "8", "--repeats", "1"]
    args = bench.build_parser().parse_args(["train.device=cuda", "train.precision=bf16", *tiny])
    r = bench.bench_infer(bench.sizes(args), bench.bench_config(args.preset, args.overrides), 2.0, 40)
    assert r["kernels"] == "eager" and set(r["matmul_peak"]) == {"torch", "flops_per_s"}
    for row in r["by_queries"]:
        assert row["peak_cuda_gib"] > 0 and row["predictions"] >= 1
        assert row["latency_over_floor"] > 1.0
    assert "peak GPU memory" in bench.inference_table([r], "cuda", "bf16")
