"""Ray Data: annotation table + feature files -> training candidates and evaluation work items.

Work is sharded by video: the dataset has one row per video (its key and the ids of its queries); a map stage
(:class:`VideoCandidates`, a callable class so the feature files are opened lazily once per Ray worker process)
reads each video's features once and emits one row per query with the query's positive windows, GT, text tokens
and (for same-video negatives) its negative window.  Execution is streaming: nothing is materialised, so memory
per worker stays bounded by the blocks in flight, whatever the dataset size.  Train workers read their shard with
``get_dataset_shard("train")`` and sample the epoch's positive window and hinge frames in the collate function
(:func:`collate_candidates`), seeded by (seed, epoch, query id) exactly as the local loader does.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from torch import Tensor

from rgnet.config import Config, from_dict, to_dict
from rgnet.data.dataset import SplitData, open_split
from rgnet.data.samples import WindowSpec, collate_train, item_rng, sample_train_item, train_candidates

# Columns of a candidate row (variable-shaped arrays travel as Ray's variable-shaped tensor columns).
CANDIDATE_COLUMNS = (
    "windows",
    "window_len",
    "spans_cw",
    "weight",
    "in_lo",
    "in_hi",
    "text",
    "neg_video",
    "neg_len",
    "sentence",
)


def video_table(data: SplitData) -> list[dict[str, Any]]:
    """One row per video: {"video_key", "query_ids"}; the order is the annotation order (deterministic)."""
    by_video: dict[str, list[str]] = {}
    for rec in data.records:
        by_video.setdefault(rec.video_key, []).append(rec.query_id)
    return [{"video_key": k, "query_ids": v} for k, v in by_video.items()]


class VideoCandidates:
    """Ray Data map: one video row -> one candidate row per query. Opens the split once per worker process."""

    def __init__(self, cfg: dict[str, Any], split: str) -> None:
        self.cfg = from_dict(cfg)
        self.data = open_split(self.cfg.data, split)
        self.spec = WindowSpec.from_config(self.cfg, self.data.fps)
        self.records = {r.query_id: r for r in self.data.records}
        self.need_negative = self.cfg.loss.negatives in ("same_video", "both")

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        frames = self.data.video(str(row["video_key"]))  # the whole video, read once for all its queries
        out = []
        for qid in row["query_ids"]:
            rec = self.records[str(qid)]
            cand = train_candidates(
                self.data, rec, self.spec, seed=self.cfg.train.seed, need_negative=self.need_negative, frames=frames
            )
            out.append({"query_id": rec.query_id, **cand})
        return out


def build_train_dataset(cfg: Config, split: str | None = None) -> ray.data.Dataset:
    """The streaming training dataset of candidate rows (one Ray Data read task per video block)."""
    data = open_split(cfg.data, split or cfg.data.train_split)
    table = video_table(data)
    ds = ray.data.from_items(table, override_num_blocks=max(1, min(len(table), 64)))
    return ds.flat_map(
        VideoCandidates,
        fn_constructor_args=(to_dict(cfg), data.split),
        concurrency=(1, max(1, int(cfg.ray.data_workers))),
        num_cpus=cfg.ray.data_cpus,
    )


def collate_candidates(
    cfg: Config, epoch_of: Callable[[], int]
) -> Callable[[dict[str, np.ndarray]], dict[str, Tensor]]:
    """A collate function for ``iter_torch_batches``: sample each row's item for the current epoch, then batch."""
    seed, negatives = cfg.train.seed, cfg.loss.negatives

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
        epoch = epoch_of()
        items = []
        for i, qid in enumerate(batch["query_id"]):
            cand = {k: batch[k][i] for k in CANDIDATE_COLUMNS if k in batch}
            items.append(sample_train_item(cand, item_rng(seed, epoch, str(qid))))
        return collate_train(items, negatives)

    return collate


def shard_seed(seed: int, epoch: int) -> int:
    """Seed of the local shuffle buffer for an epoch (same order on a resumed run)."""
    return zlib.crc32(f"{seed}:{epoch}".encode())
