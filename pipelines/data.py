"""Ray Data: annotation table + feature files -> the training batches of every Ray Train worker, and the
evaluation stream of batch inference (:func:`build_eval_dataset`: one video with all its windows and queries per row,
predicted by actors that hold the model).

Work is sharded by video: the dataset starts as one row per video (its key and the ids of its queries); a map
stage (:func:`read_video`, backed by :class:`VideoCandidates`, a callable class that opens the split lazily and
keeps the HDF5 handles as its state, built once per Ray worker process and cached there) reads each video's
features once per epoch and emits one row per query with
the query's positive windows, clipped GT, in-moment frame ranges, text tokens and (for same-video negatives) its
negative window (``rgnet.data.samples.train_candidates``).  Execution is streaming: nothing is materialised, so
memory stays bounded by the blocks in flight whatever the dataset size (``pipelines.bench --data`` measures it).

Train workers read their shard with ``ray.train.get_dataset_shard("train")`` and call :func:`epoch_batches` every
epoch; its collate function draws each query's positive window and hinge frames with
``item_rng(seed, epoch, query_id)``, exactly as the local loader does, so the samples do not depend on how the
rows were sharded or ordered.

Glossary: n positive windows of a query, W frames per window, Dv / Dt video / text widths, L query tokens.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import Tensor

from rgnet.config import Config, from_dict, to_dict
from rgnet.data.dataset import SplitData, open_split
from rgnet.data.samples import WindowSpec, collate_train, item_rng, sample_train_item, train_candidates

if TYPE_CHECKING:
    import ray.data

# Columns of a candidate row besides ``query_id``; the variable-shaped ones (windows (n, W, Dv), text (L, Dt) and
# the per-window vectors (n,)) travel as Ray's variable-shaped tensor columns.  neg_video / neg_len exist only with
# same-video negatives, sentence only when the dataset has sentence features.
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
MAX_VIDEO_BLOCKS = 256  # one block (= one map task input) per video up to this many; block order is shuffled


def video_table(data: SplitData) -> list[dict[str, Any]]:
    """One row per video: {"video_key", "query_ids"}; the order is the annotation order (deterministic)."""
    by_video: dict[str, list[str]] = {}
    for rec in data.records:
        by_video.setdefault(rec.video_key, []).append(rec.query_id)
    return [{"video_key": k, "query_ids": v} for k, v in by_video.items()]


class VideoCandidates:
    """Ray Data map: one video row -> one candidate row per query of the video.

    Constructed once per Ray worker process (an actor of the map stage): the split is opened here, with its
    metadata checks, and the feature stores open their files on first read.  ``cfg`` is the resolved config as a
    plain dict (what travels to Ray processes).
    """

    def __init__(self, cfg: dict[str, Any], split: str) -> None:
        self.cfg = from_dict(cfg)
        self.data = open_split(self.cfg.data, split)
        self.spec = WindowSpec.from_config(self.cfg, self.data.fps)
        self.records = {r.query_id: r for r in self.data.records}
        self.need_negative = self.cfg.loss.negatives in ("same_video", "both")

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        frames = self.data.video(str(row["video_key"]))  # (T, Dv): the whole video, read once for all its queries
        out = []
        for qid in row["query_ids"]:
            rec = self.records[str(qid)]
            cand = train_candidates(
                self.data, rec, self.spec, seed=self.cfg.train.seed, need_negative=self.need_negative, frames=frames
            )
            out.append({"query_id": rec.query_id, **cand})
        return out


# Per worker process: (config as JSON, split) -> its open reader.  Map *tasks* with this cache rather than an actor
# pool of VideoCandidates: Ray Data starts a new actor pool at every execution (every epoch), which costs a process
# start and the torch import per actor per epoch (about 8 s per epoch on the tiny preset here), while task worker
# processes are reused across executions (about 1 s per epoch after the first).
_READERS: dict[tuple[str, str], VideoCandidates] = {}


def read_video(row: dict[str, Any], cfg: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """Ray Data flat_map task: :class:`VideoCandidates` of this process (built on first use) applied to ``row``."""
    key = (json.dumps(cfg, sort_keys=True), split)
    reader = _READERS.get(key)
    if reader is None:
        reader = _READERS[key] = VideoCandidates(cfg, split)
    return reader(row)


def build_train_dataset(cfg: Config, data: SplitData) -> ray.data.Dataset:
    """The streaming dataset of candidate rows for the (already opened and checked) training split ``data``.

    The video table is tiny and lives in the object store; its block order is reshuffled at every execution (every
    epoch), then the map tasks (at most ``ray.data_workers`` at a time, ``ray.data_cpus`` CPUs each) read the
    features.
    """
    import ray.data

    table = video_table(data)
    videos: ray.data.Dataset = ray.data.from_items(table, override_num_blocks=max(1, min(len(table), MAX_VIDEO_BLOCKS)))
    videos = videos.randomize_block_order(
        seed=ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    )
    return videos.flat_map(
        read_video,
        fn_args=(to_dict(cfg), data.split),
        compute=ray.data.TaskPoolStrategy(size=max(1, cfg.ray.data_workers)),
        num_cpus=cfg.ray.data_cpus,
    )


class CollateCandidates(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: draw each row's training item for ``epoch`` (0-based), then build the batch.

    Ray hands the batch as a dict of numpy arrays (object arrays of ndarrays for the variable-shaped columns, a
    string array for ``query_id``, which is why a collate function is needed at all).
    """

    def __init__(self, cfg: Config, epoch: int) -> None:
        self.seed, self.negatives, self.epoch = cfg.train.seed, cfg.loss.negatives, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
        items = []
        for i, qid in enumerate(batch["query_id"]):
            cand = {k: np.asarray(batch[k][i]) for k in CANDIDATE_COLUMNS if k in batch}
            items.append(sample_train_item(cand, item_rng(self.seed, self.epoch, str(qid))))
        return collate_train(items, self.negatives)


def steps_per_epoch(num_queries: int, world_size: int, cfg: Config) -> int:
    """Full batches per worker and epoch: the shards are equal (the remainder rows are dropped), so are the steps.

    Every rank must run the same number of steps (DDP all-reduces every step) and the same as the local loader's
    ``TrainBatches.num_batches`` for the same world size.
    """
    n = (num_queries // max(world_size, 1)) // cfg.train.batch_size
    if cfg.train.max_steps_per_epoch:
        n = min(n, cfg.train.max_steps_per_epoch)
    return n


def epoch_batches(shard: Any, cfg: Config, epoch: int, num_steps: int, *, rank: int = 0) -> Iterator[dict[str, Tensor]]:
    """One epoch of model batches from a worker's dataset shard (a ``DataIterator``), at most ``num_steps``.

    A fresh ``iter_torch_batches`` per epoch streams a new pass over the data.  The local shuffle buffer mixes
    queries of different videos into a batch (rows arrive video by video); its seed depends on (seed, epoch, rank).
    """
    bs = cfg.train.batch_size
    batches = shard.iter_torch_batches(
        batch_size=bs,
        collate_fn=CollateCandidates(cfg, epoch),
        drop_last=True,
        local_shuffle_buffer_size=max(4 * bs, 64),
        local_shuffle_seed=shuffle_seed(cfg.train.seed, epoch, rank),
        prefetch_batches=2,
    )
    for step, batch in enumerate(batches):
        if step >= num_steps:
            break
        yield batch


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a worker's local shuffle buffer for an epoch (the same on a resumed run)."""
    return zlib.crc32(f"{seed}:{epoch}:{rank}".encode())


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: one video (all its windows, every query about it) per row, through model-holding actors
# ---------------------------------------------------------------------------------------------------------------
class VideoPredictor:
    """A Ray Data actor: holds the model and the split's feature stores; one video in, one row per query out."""

    def __init__(
        self,
        payload_ref: list[Any],
        overrides: list[str],
        split: str,
        timeline_ids: list[str],
        num_threads: int,
    ) -> None:
        import ray
        import torch

        from pipelines.predict import model_and_config
        from rgnet.train.loop import resolve_device

        torch.set_num_threads(max(1, num_threads))
        payload = ray.get(payload_ref[0])  # wrapped in a list so that Ray hands over the reference, not a copy
        self.model, self.cfg = model_and_config(payload, overrides)
        self.device = resolve_device(self.cfg.train.device)
        self.model.to(self.device).eval()
        self.data = open_split(self.cfg.data, split)
        self.by_id = {r.query_id: r for r in self.data.records}
        self.timeline_ids = set(timeline_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rgnet.data.samples import video_item
        from rgnet.eval.inference import infer_video, window_rows

        spec = WindowSpec.from_config(self.cfg, self.data.fps)
        rows_out: list[str] = []
        timelines: list[str] = []
        for key, ids in zip(batch["video_key"], batch["query_ids"]):
            records = [self.by_id[str(q)] for q in ids]
            item = video_item(self.data, spec, str(key), records)
            want = [i for i, r in enumerate(records) if r.query_id in self.timeline_ids]
            rows, scores = infer_video(self.model, item, self.cfg.eval, self.device, keep_sampling_scores=bool(want))
            for i, row in enumerate(window_rows(item, scores, rows)):
                rows_out.append(json.dumps(row.to_json()))
                timelines.append(json.dumps(self._timeline(item, scores, i, row)) if i in want else "")
        return {"row": np.array(rows_out, dtype=object), "timeline": np.array(timelines, dtype=object)}

    def _timeline(self, item: Any, scores: Any, i: int, row: Any) -> dict[str, Any]:
        from rgnet.eval.plots import TIMELINE_PREDICTIONS, frame_score_curve

        rec = item.records[i]
        num_frames = int(item.frames.shape[0])
        curve = frame_score_curve(item.bounds, scores.sampling_score[i].numpy(), num_frames)
        return {
            "query_id": rec.query_id,
            "query": rec.query,
            "video_id": rec.video_id,
            "duration_sec": item.duration_sec,
            "fps": item.spec.fps,
            "bounds": item.bounds.tolist(),
            "context_logit": scores.context_logit[i].tolist(),
            "frame_scores": [None if np.isnan(v) else float(v) for v in curve],
            "gt": [rec.start_sec, rec.end_sec],
            "predictions": row.predictions[:TIMELINE_PREDICTIONS],
        }


def build_eval_dataset(
    payload: dict[str, Any],
    overrides: list[str],
    split: str,
    videos: list[dict[str, Any]],
    *,
    actors: int,
    cpus: float,
    gpus: float,
    timeline_ids: list[str],
) -> ray.data.Dataset:
    """Prediction rows (``row``: a prediction JSON line; ``timeline``: plot data or "") for every query of ``split``.

    One input row per video (``videos``: :func:`video_table` rows), one block each, so rows stream out video by
    video; ``actors`` :class:`VideoPredictor` actors with ``cpus`` / ``gpus`` each hold the model (the checkpoint
    payload goes through the object store once) and the split's feature readers.
    """
    import ray

    rows = ray.data.from_items(videos, override_num_blocks=len(videos))
    return rows.map_batches(
        VideoPredictor,
        fn_constructor_kwargs={
            "payload_ref": [ray.put(payload)],
            "overrides": overrides,
            "split": split,
            "timeline_ids": timeline_ids,
            "num_threads": int(cpus),
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
