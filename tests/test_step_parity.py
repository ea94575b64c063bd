"""One global step, whatever the number of workers: ``rgnet train --local`` and 2 Ray Train workers compute the same
step (DESIGN section 6; rgnet.data.samples and rgnet.train.loop).

Both paths run the library's step (``rgnet.train.loop.train_step``) on the same seeded epoch plan: the local one
reads each global batch in this process (``TrainBatches``); each Ray Train worker reads its half of every step from
its own Ray Data stream (``pipelines.data.WorkerSteps``), gathers the other half's windows and computes its share
of the loss under DDP (gloo).  Dropout and Gumbel noise are on, drawn from each window's, query's and pair's keyed
stream (rgnet.model.randomness), so the draws are the same per pair in both paths without switching them off.
Both run one torch thread.  Compared: the loss of every step, every parameter's gradient after the first step (as
the optimizer used it), and every parameter after three AdamW steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rgnet.config import Config, apply_overrides, from_dict, load_config, to_dict

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 3
TESTS = str(Path(__file__).resolve().parent)


def _run_steps(cfg: Config, batches: Any, model: torch.nn.Module, group: Any, device: torch.device) -> list[dict]:
    """Train STEPS steps; after each: the global losses, the gradients (as clipped and used) and the parameters."""
    from rgnet.model import Criterion
    from rgnet.train.checkpoint import unwrap
    from rgnet.train.loop import build_optimizer, build_scheduler, train_step

    criterion = Criterion(cfg.loss)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, STEPS)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    out = []
    for _, shard in zip(range(STEPS), batches):
        losses = train_step(model, criterion, shard, optimizer, scheduler, cfg, device, scaler, group)
        named = list(unwrap(model).named_parameters())
        out.append(
            {
                "losses": losses,
                "grads": {n: p.grad.detach().clone() for n, p in named if p.grad is not None},
                "params": {n: p.detach().clone() for n, p in named},
            }
        )
    return out


def parity_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the steps of rank r of 2 under DDP, saved by rank 0."""
    import ray.train
    import ray.train.torch

    from pipelines.data import WorkerSteps
    from rgnet.model import build_model
    from rgnet.train.distributed import step_group
    from rgnet.train.loop import seed_everything, set_threads

    cfg = from_dict(config["cfg"])
    set_threads(1, 1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    group = step_group()
    seed_everything(cfg.train.seed)
    model = ray.train.torch.prepare_model(build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim))
    with WorkerSteps(cfg, cfg.data.train_split, 0, 1, rank, world, STEPS) as steps:
        records = _run_steps(cfg, steps.epoch(0), model, group, torch.device("cpu"))
    if rank == 0:
        torch.save(records, config["out"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Config:
    from rgnet.data.synthetic import ensure_dataset

    root = tmp_path_factory.mktemp("parity") / "tiny"
    cfg = load_config("tiny", overrides=[f"data.root={root}", "model.dropout=0.2", "model.input_dropout=0.2"])
    ensure_dataset(cfg.data)
    return cfg


def _local(cfg: Config) -> list[dict]:
    from rgnet.data.dataset import open_split
    from rgnet.data.samples import TrainBatches
    from rgnet.model import build_model
    from rgnet.train.distributed import SOLO
    from rgnet.train.loop import seed_everything, set_threads

    threads = torch.get_num_threads()
    set_threads(1, 1)
    try:
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
        batches = TrainBatches(
            open_split(cfg.data, cfg.data.train_split), windows=cfg.windows, train=cfg.train, loss=cfg.loss
        ).epoch(0)
        return _run_steps(cfg, batches, model, SOLO, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def _distributed(cfg: Config, out: Path) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        parity_worker,
        train_loop_config={"cfg": to_dict(cfg), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="parity",
            storage_path=str(out.parent / "ray"),
            # the workers unpickle parity_worker by module name: put this test folder on their path
            worker_runtime_env={
                "env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
            },
        ),
    ).fit()
    return torch.load(out, weights_only=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the default: in-batch negatives
        ["loss.negatives=both", "model.attention_dropout=0.1"],  # same-video negatives, keyed attention dropout
    ],
    ids=["in_batch", "both+attention_dropout"],
)
def test_two_workers_compute_the_local_step(ray_session: str, tiny: Config, tmp_path: Path, extra: list[str]) -> None:
    cfg = apply_overrides(tiny, extra)
    local = _local(cfg)
    dist = _distributed(cfg, tmp_path / "steps.pt")
    assert len(local) == len(dist) == STEPS
    for step, (a, b) in enumerate(zip(local, dist)):
        for key, value in a["losses"].items():
            assert b["losses"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {step} {key}"
    first_local, first_dist = local[0]["grads"], dist[0]["grads"]
    assert first_local.keys() == first_dist.keys() and len(first_local) == len(local[0]["params"])
    worst = max(first_local, key=lambda n: _relative(first_dist[n], first_local[n]))
    assert _relative(first_dist[worst], first_local[worst]) <= 1e-5, f"gradient of {worst}"
    # Parameters after STEPS AdamW steps.  Where an element's gradient is rounding noise (a few parameters whose true
    # gradient is ~0: low-frequency cosine position channels feeding key projections act as key biases, which the
    # softmax cancels), AdamW's update m / (sqrt(v) + eps) normalises the noise into a step of up to lr, so the two
    # paths' rounding differences (gradient sums over 64 pairs in one process vs 32 + 32 and an all-reduce) move
    # those elements apart by up to a few lr/100.  Every other element must agree within 1e-5.
    lr = cfg.optim.lr
    for name, value in local[-1]["params"].items():
        real = torch.stack([r["grads"][name].abs() for r in local]).amax(dim=0) >= 1e-7
        diff = (dist[-1]["params"][name] - value).abs()
        assert float(torch.where(real, diff, 0.0).max()) <= 1e-5, f"parameter {name}"
        assert float(diff.max()) <= 2 * STEPS * lr, f"parameter {name} (rounding-level gradients)"
