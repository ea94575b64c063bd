"""Ray Data pipeline: one candidate row per query, read video by video; the per-epoch draw equals the local loader's."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from pipelines.data import CANDIDATE_COLUMNS, build_train_dataset, epoch_batches, steps_per_epoch, video_table
from rgnet.config import Config, from_dict, load_config
from rgnet.data.dataset import open_split
from rgnet.data.samples import WindowSpec, item_rng, make_train_item, sample_train_item

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]  # slow: the session Ray starts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Config:
    from rgnet.data.synthetic import ensure_dataset

    cfg = load_config("tiny", overrides=[f"data.root={tmp_path_factory.mktemp('ray_data') / 'tiny'}"])
    ensure_dataset(cfg.data)
    return cfg


@pytest.mark.parametrize("negatives", ["in_batch", "both"])
def test_rows_draw_the_local_loaders_items(ray_session: str, tiny: Config, negatives: str) -> None:
    cfg = from_dict({"loss": {"negatives": negatives}}, tiny)
    data = open_split(cfg.data, cfg.data.train_split)
    assert sum(len(v["query_ids"]) for v in video_table(data)) == len(data.records)
    rows = build_train_dataset(cfg, data).take_all()
    records = {r.query_id: r for r in data.records}
    assert sorted(str(r["query_id"]) for r in rows) == sorted(records)  # every query exactly once
    spec = WindowSpec.from_config(cfg, data.fps)
    seed = cfg.train.seed
    for epoch in (0, 5):
        for row in rows:
            qid = str(row["query_id"])
            cand = {k: np.asarray(row[k]) for k in CANDIDATE_COLUMNS if k in row}
            ours = sample_train_item(cand, item_rng(seed, epoch, qid))
            local = make_train_item(
                data, records[qid], spec, item_rng(seed, epoch, qid), seed=seed, need_negative=negatives == "both"
            )
            assert ours.keys() == local.keys()
            for key in local:
                np.testing.assert_array_equal(ours[key], local[key], err_msg=f"{qid} {key} epoch {epoch}")


def test_two_shards_give_equal_full_batches(ray_session: str, tiny: Config) -> None:
    data = open_split(tiny.data, tiny.data.train_split)
    shards = build_train_dataset(tiny, data).streaming_split(2, equal=True)
    steps = steps_per_epoch(len(data.records), 2, tiny)
    assert steps == len(data.records) // 2 // tiny.train.batch_size
    got: dict[int, list[dict[str, Any]]] = {}

    def consume(rank: int) -> None:  # the shards of a streaming split are consumed concurrently, as by workers
        got[rank] = list(epoch_batches(shards[rank], tiny, epoch=1, num_steps=steps, rank=rank))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert [len(got[r]) for r in range(2)] == [steps, steps]
    bs = tiny.train.batch_size
    for batch in got[0] + got[1]:
        assert batch["text"].shape[0] == bs and batch["video"].shape[0] == bs
        assert batch["pair_window"].numel() == bs * bs  # in-batch negatives: every query with every window
