"""Ray Data training pipeline: each rank's stream holds exactly its part of every global step, in step order, and
the parts of all ranks put together are the one-process batch (rgnet.data.samples)."""

from __future__ import annotations

import pytest
import torch

from pipelines.data import WorkerSteps
from rgnet.config import Config, apply_overrides, load_config
from rgnet.data.dataset import SplitData, open_split
from rgnet.data.samples import TrainBatches, shard_slice, steps_per_epoch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]  # slow: the session Ray starts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Config:
    from rgnet.data.synthetic import ensure_dataset

    cfg = load_config("tiny", overrides=[f"data.root={tmp_path_factory.mktemp('ray_data') / 'tiny'}"])
    ensure_dataset(cfg.data)
    return cfg


@pytest.mark.parametrize("negatives", ["in_batch", "both"])
def test_rank_streams_are_the_parts_of_the_local_steps(ray_session: str, tiny: Config, negatives: str) -> None:
    cfg = apply_overrides(tiny, [f"loss.negatives={negatives}"])
    data = open_split(cfg.data, cfg.data.train_split)
    steps = steps_per_epoch(len(data.records), cfg.train.batch_size)
    assert steps == len(data.records) // cfg.train.batch_size
    epoch = 3
    streams = [WorkerSteps(cfg, cfg.data.train_split, epoch, epoch + 2, rank, 2, steps) for rank in range(2)]
    try:
        _check(cfg, data, streams, epoch, steps)
    finally:
        for stream in streams:
            stream.close()


def _check(cfg: Config, data: SplitData, streams: list[WorkerSteps], epoch: int, steps: int) -> None:
    local = list(TrainBatches(data, windows=cfg.windows, train=cfg.train, loss=cfg.loss).epoch(epoch))
    parts = [list(stream.epoch(epoch)) for stream in streams]
    assert len(local) == len(parts[0]) == len(parts[1]) == steps
    for step, whole in enumerate(local):
        for rank in range(2):
            part, rows = parts[rank][step], shard_slice(cfg.train.batch_size, rank, 2)
            assert part.keys() == whole.keys()
            for key, value in part.items():  # every field, bit for bit; texts padded to the global batch's length
                torch.testing.assert_close(value, whole[key][rows], rtol=0, atol=0, msg=f"step {step} {key}")
    # the stream goes on into the next epoch: its steps are the local loader's too, and another plan
    following = list(TrainBatches(data, windows=cfg.windows, train=cfg.train, loss=cfg.loss).epoch(epoch + 1))
    nxt = list(streams[0].epoch(epoch + 1))
    torch.testing.assert_close(nxt[0]["video"], following[0]["video"][:4], rtol=0, atol=0)
    assert not torch.equal(nxt[0]["text_key"], parts[0][0]["text_key"])
    with pytest.raises(RuntimeError, match="epoch 5 step 0 was due"):  # epochs out of order are refused
        next(iter(streams[1].epoch(epoch + 2)))
