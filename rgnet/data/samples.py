"""Training and evaluation samples: from query records and feature stores to model batches.

Glossary (``rgnet`` package docstring): B queries of a global batch (``train.batch_size``), B_r = B / R the queries of one of R ranks (processes
that share a step: 1 in ``rgnet train --local``, ``ray.num_workers`` on Ray), Lv = W frames per window, Lq words,
Dv / Dt video / text widths.

**One global step, defined here for every path.**  An epoch is a seeded function of (seed, epoch):
:func:`epoch_plan` permutes the split's queries and cuts the permutation into full global batches of B queries; for
each query :func:`train_item` draws its positive window and its in-moment / out-of-moment hinge frames (Eq. 6) with a
generator seeded by (seed, epoch, query id), and its same-video negative window once per query (seeded by (seed,
query id)); every window and query of a step also gets the keys of its random streams (dropout and Gumbel noise,
``rgnet.model.randomness``) from (seed, epoch, step, its slot in the global batch).  Rank r of R takes the queries
``shard_slice(B, r, R)`` of every global batch (:func:`read_shard`, :func:`collate_shard`); :func:`assemble_step`
turns a rank's part into the model batch of *pair sharding*: the rank's queries paired with all B positive windows
of the global batch (gathered from the other ranks when R > 1) plus its own negatives.  With R = 1 it is the whole
global batch.  The losses are then normalised by the global B (``rgnet.model.criterion``) and the window-to-query
InfoNCE columns gather their logits across ranks, so R ranks compute exactly the one-process step.

An *evaluation item* is a video with all its windows and every query about it: the encoder runs on every
(window, query) pair of the video, the decoder on the top-k windows per query only (rgnet.eval.inference).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rgnet.config import LossConfig, TrainConfig, WindowConfig
from rgnet.data.dataset import SplitData
from rgnet.data.records import QueryRecord
from rgnet.data.windows import clip_to_window_cw, positive_windows, window_bounds, window_frames
from rgnet.model.randomness import mix_keys


@dataclass(frozen=True)
class WindowSpec:
    """Window geometry in frames for one dataset (fps fixed per dataset)."""

    length: int  # W
    stride: int  # S
    fps: float

    @classmethod
    def from_config(cls, windows: WindowConfig, fps: float) -> WindowSpec:
        """The ``windows`` section's length and stride in seconds, as frames at ``fps``."""
        length, stride = window_frames(windows.length_sec, windows.stride_sec, fps)
        return cls(length, stride, fps)


# ---------------------------------------------------------------------------------------------------------------
# The epoch's global batches
# ---------------------------------------------------------------------------------------------------------------
def steps_per_epoch(num_queries: int, batch_size: int, max_steps: int = 0) -> int:
    """Full global batches per epoch: the last partial batch is dropped (in-batch negatives need B queries);
    ``max_steps`` > 0 caps it (``train.max_steps_per_epoch``).  The same for any number of ranks."""
    n = num_queries // batch_size
    return min(n, max_steps) if max_steps else n


def epoch_plan(num_queries: int, batch_size: int, seed: int, epoch: int, max_steps: int = 0) -> np.ndarray:
    """(steps, B) int64: the record indices of every global batch of ``epoch`` (0-based), a seeded permutation."""
    steps = steps_per_epoch(num_queries, batch_size, max_steps)
    order = np.random.default_rng([seed, epoch]).permutation(num_queries)
    return order[: steps * batch_size].reshape(steps, batch_size)


def shard_slice(batch_size: int, rank: int, world: int) -> slice:
    """The global-batch slots of rank ``rank`` of ``world``: B / R consecutive slots."""
    if batch_size % world:
        raise ValueError(
            f"train.batch_size={batch_size} (queries per global step) does not split over {world} workers: choose "
            f"a multiple of ray.num_workers"
        )
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)


def step_key(seed: int, epoch: int, step: int) -> int:
    """The root of a step's random-stream keys."""
    return int(mix_keys(seed, epoch, step))


def item_rng(seed: int, epoch: int, query_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, query): the draw is independent of sharding and order."""
    return np.random.default_rng([seed, epoch, zlib.crc32(query_id.encode())])


def train_item(
    data: SplitData,
    record: QueryRecord,
    spec: WindowSpec,
    *,
    seed: int,
    epoch: int,
    key: int,
    slot: int,
    need_negative: bool,
    frames: np.ndarray | None = None,
) -> dict[str, Any]:
    """One query's training item for ``epoch``: a positive window, the GT clipped to it, a hinge frame pair, the
    text, optionally a same-video negative window, and the keys of its random streams.

    The positive window is drawn among the windows that overlap the moment with probability proportional to the
    overlap, then the in-moment frame uniformly in the window-relative moment [in_lo, in_hi) and the out-of-moment
    frame uniformly among the others (``item_rng(seed, epoch, query id)``); only the drawn window is read.  The
    negative is a window of the same video that does not overlap the moment, drawn once per query (seeded by (seed,
    query id)); a query whose moment overlaps every window has none (``neg_len`` 0).  ``key`` / ``slot``: the
    step's key and the query's slot in the global batch.  ``frames`` (the whole video, when the caller holds it)
    avoids re-reading slices.
    """
    num_frames = data.num_frames(record.video_key) if frames is None else len(frames)
    bounds = window_bounds(num_frames, spec.length, spec.stride)  # (P, 2) frames [start, stop)
    start_f = min(record.start_sec * spec.fps, num_frames)
    end_f = min(record.end_sec * spec.fps, num_frames)
    pos = positive_windows(bounds, start_f, end_f)
    if len(pos) == 0:  # only possible for a moment past the features' end; readers reject those
        raise ValueError(
            f"query {record.query_id}: no window overlaps the moment [{record.start_sec}, {record.end_sec}] s"
        )

    def read(w: int) -> np.ndarray:
        a, b = int(bounds[w, 0]), int(bounds[w, 1])
        chunk = frames[a:b] if frames is not None else data.video_slice(record.video_key, a, b)
        return _padded(chunk, spec.length)

    rng = item_rng(seed, epoch, record.query_id)
    # The released code favours the middle positive window with a Gaussian on window ids; weighting by overlap keeps
    # the sliver windows that barely touch the moment rare without that arbitrary shape (a deliberate deviation).
    overlap = np.minimum(bounds[pos, 1], max(end_f, start_f + 1e-3)) - np.maximum(bounds[pos, 0], start_f)
    weight = np.clip(overlap, 1e-3, None).astype(np.float64)
    w = int(pos[int(rng.choice(len(pos), p=weight / weight.sum()))])
    lo, hi = int(bounds[w, 0]), int(bounds[w, 1])
    valid = hi - lo
    in_lo = int(np.clip(np.floor(start_f) - lo, 0, valid - 1))
    in_hi = int(np.clip(np.ceil(end_f) - lo, in_lo + 1, valid))
    in_frame = int(rng.integers(in_lo, in_hi))
    outside = np.concatenate([np.arange(0, in_lo), np.arange(in_hi, valid)])
    out_frame = int(rng.choice(outside)) if len(outside) else in_frame  # no outside frame: the hinge is constant
    item = {
        "video": read(w),
        "video_len": np.int64(valid),
        "text": data.text(record.query_key),
        "span_cw": np.asarray(clip_to_window_cw(start_f, end_f, lo, hi), dtype=np.float32),
        "in_frame": np.int64(in_frame),
        "out_frame": np.int64(out_frame),
        "window_key": np.int64(mix_keys(key, 1, slot)),
        "text_key": np.int64(mix_keys(key, 2, slot)),
    }
    if need_negative:
        others = np.setdiff1d(np.arange(len(bounds)), pos)
        if len(others):
            n = int(np.random.default_rng([seed, zlib.crc32(record.query_id.encode())]).choice(others))
            item["neg_video"], item["neg_len"] = read(n), np.int64(bounds[n, 1] - bounds[n, 0])
        else:
            item["neg_video"], item["neg_len"] = np.zeros_like(item["video"]), np.int64(0)
        item["neg_key"] = np.int64(mix_keys(key, 4, slot))
    if data.sentences is not None:
        item["sentence"] = data.sentence(record.query_key)
    return item


def read_shard(
    data: SplitData,
    spec: WindowSpec,
    train: TrainConfig,
    loss: LossConfig,
    plan: np.ndarray,
    epoch: int,
    step: int,
    rank: int,
    world: int,
) -> dict[str, Tensor]:
    """Rank ``rank``'s part of global step ``step`` (``plan``: the epoch's :func:`epoch_plan`), collated.

    Texts are padded to the longest query of the *global* batch (a metadata read), so every rank's tensors have the
    shapes one process would have: a row's random draws and the kernels' summation order then do not depend on the
    sharding.
    """
    part = shard_slice(train.batch_size, rank, world)
    key = step_key(train.seed, epoch, step)
    need_negative = loss.negatives in ("same_video", "both")
    text_length = max(data.text_length(data.records[int(i)].query_key) for i in plan[step])
    items = [
        train_item(
            data,
            data.records[int(plan[step, slot])],
            spec,
            seed=train.seed,
            epoch=epoch,
            key=key,
            slot=slot,
            need_negative=need_negative,
        )
        for slot in range(part.start, part.stop)
    ]
    return collate_shard(items, text_length)


def _padded(frames: np.ndarray, length: int) -> np.ndarray:
    """(T', Dv) -> (length, Dv) with zero rows after the valid frames."""
    out = np.zeros((length, frames.shape[1]), dtype=np.float32)
    out[: len(frames)] = frames
    return out


def _mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]  # (n, size) True = valid


def pad_texts(texts: Sequence[np.ndarray], length: int = 0) -> tuple[Tensor, Tensor]:
    """List of (L_i, Dt) -> (B, Lq, Dt) zero-padded, (B, Lq) bool mask; Lq = max(length, longest L_i)."""
    lq = max(length, *(len(t) for t in texts))
    out = torch.zeros(len(texts), lq, texts[0].shape[1])
    for i, t in enumerate(texts):
        out[i, : len(t)] = torch.from_numpy(np.asarray(t))
    lengths = torch.tensor([len(t) for t in texts])
    return out, _mask(lengths, lq)


SHARD_FIELDS = ("video", "video_len", "window_key", "text", "text_mask", "text_key", "span_cw", "in_frame", "out_frame")
OPTIONAL_SHARD_FIELDS = ("neg_video", "neg_len", "neg_key", "sentence")


def collate_shard(items: Sequence[dict[str, np.ndarray]], text_length: int = 0) -> dict[str, Tensor]:
    """Stack a rank's items (its B_r queries of one global step) into tensors; pairs are built later
    (:func:`assemble_step`), once the step's other windows are known.

    Fields: video (B_r, Lv, Dv) positive windows, video_len (B_r,), window_key (B_r,), text (B_r, Lq, Dt) with
    text_mask (B_r, Lq), text_key (B_r,), span_cw (B_r, 2), in_frame / out_frame (B_r,); with same-video negatives
    neg_video (B_r, Lv, Dv), neg_len (B_r,) (0 = none) and neg_key (B_r,); sentence (B_r, Dv) when the dataset has
    sentence features.  Texts are padded to at least ``text_length`` tokens.
    """
    text, text_mask = pad_texts([it["text"] for it in items], text_length)
    out = {"text": text, "text_mask": text_mask}
    for key in (*SHARD_FIELDS, *OPTIONAL_SHARD_FIELDS):
        if key not in out and key in items[0]:
            out[key] = torch.from_numpy(np.stack([np.asarray(it[key]) for it in items]))
    return out


Gather = Callable[[Tensor], Tensor]  # (B_r, ...) of this rank -> (B, ...) of all ranks in rank order


def assemble_step(
    shard: dict[str, Tensor],
    negatives: str,
    *,
    offset: int = 0,
    num_queries: int | None = None,
    gather: Gather | None = None,
) -> dict[str, Tensor]:
    """A rank's part of a global step -> the model batch of pair sharding (schema: ``rgnet.model.rgnet``).

    ``offset`` is the global slot of the rank's first query and ``num_queries`` the global B; ``gather`` collects
    the positive windows (features, lengths, stream keys) of all ranks, in slot order (None: one rank holds the
    whole batch).  Windows: [the B positive windows; then this rank's same-video negatives]; pairs: the rank's
    queries with every positive window (in_batch / both) and with their own negative (same_video / both).
    """
    from rgnet.model import build_pairs

    b_r = shard["text"].shape[0]
    b = b_r if num_queries is None else num_queries
    video, lengths, window_key = shard["video"], shard["video_len"], shard.get("window_key")
    if gather is not None and b != b_r:
        video, lengths = gather(video), gather(lengths)
        window_key = gather(window_key) if window_key is not None else None
    neg_window = torch.full((b_r,), -1, dtype=torch.long)
    if negatives in ("same_video", "both"):
        has_neg = shard["neg_len"] > 0
        video = torch.cat([video, shard["neg_video"][has_neg]])  # (B + B', Lv, Dv)
        lengths = torch.cat([lengths, shard["neg_len"][has_neg]])
        if window_key is not None:
            window_key = torch.cat([window_key, shard["neg_key"][has_neg]])
        neg_window[has_neg] = b + torch.arange(int(has_neg.sum()))
    pair_window, pair_text, positive_pair = build_pairs(b_r, negatives, neg_window, num_windows=b, offset=offset)
    batch = {
        "video": video,
        "video_mask": _mask(lengths, video.shape[1]),
        "neg_window": neg_window,
        "pair_window": pair_window,
        "pair_text": pair_text,
        "positive_pair": positive_pair,
    }
    if window_key is not None:
        batch["window_key"] = window_key
    for key in ("text", "text_mask", "text_key", "span_cw", "in_frame", "out_frame", "sentence"):
        if key in shard:
            batch[key] = shard[key]
    return batch


def collate_train(items: Sequence[dict[str, np.ndarray]], negatives: str) -> dict[str, Tensor]:
    """Items of one whole global batch -> its model batch (one rank): :func:`collate_shard` + :func:`assemble_step`."""
    return assemble_step(collate_shard(items), negatives)


class TrainBatches:
    """The epoch's global steps read in this one process (``rgnet train --local``): rank 0 of 1, each batch the
    collated :func:`read_shard` of the whole global batch (``assemble_step`` makes the model batch).  Reads the
    config's ``windows`` (geometry), ``train`` (batch size, seed, steps) and ``loss`` (negatives) sections."""

    def __init__(self, data: SplitData, *, windows: WindowConfig, train: TrainConfig, loss: LossConfig) -> None:
        self.data = data
        self.train = train
        self.loss = loss
        self.spec = WindowSpec.from_config(windows, data.fps)

    def num_batches(self) -> int:
        return steps_per_epoch(len(self.data.records), self.train.batch_size, self.train.max_steps_per_epoch)

    def plan(self, epoch: int) -> np.ndarray:
        t = self.train
        return epoch_plan(len(self.data.records), t.batch_size, t.seed, epoch, t.max_steps_per_epoch)

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        plan = self.plan(epoch)
        for step in range(len(plan)):
            yield read_shard(self.data, self.spec, self.train, self.loss, plan, epoch, step, 0, 1)


@dataclass
class VideoItem:
    """One video and the queries about it (the unit of evaluation); windows are gathered lazily per chunk."""

    video_key: str
    duration_sec: float
    frames: Tensor  # (T, Dv) raw features
    bounds: np.ndarray  # (P, 2) frames [start, stop) of every window
    spec: WindowSpec
    records: list[QueryRecord]
    texts: list[np.ndarray]  # (L_i, Dt) per query
    sentences: list[np.ndarray] | None  # (Dv,) per query when the dataset has sentence features


def gather_windows(
    frames: Tensor, bounds: np.ndarray, length: int, which: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Windows ``which`` (default all) of a video: (T, Dv) -> (P', Lv, Dv) zero-padded and (P', Lv) bool mask.

    One index gather, no Python loop over windows; only the requested windows are materialised, so the caller
    bounds memory by asking for chunks.
    """
    b = torch.from_numpy(bounds) if which is None else torch.from_numpy(bounds)[which]
    idx = b[:, :1] + torch.arange(length)[None, :]  # (P', Lv) frame index
    mask = idx < b[:, 1:2]
    windows = frames[idx.clamp(max=frames.shape[0] - 1)]  # (P', Lv, Dv)
    return windows * mask[..., None], mask


def video_item(data: SplitData, spec: WindowSpec, video_key: str, records: list[QueryRecord]) -> VideoItem:
    frames = torch.from_numpy(np.ascontiguousarray(data.video(video_key), dtype=np.float32))
    return VideoItem(
        video_key=video_key,
        duration_sec=records[0].duration_sec,
        frames=frames,
        bounds=window_bounds(frames.shape[0], spec.length, spec.stride),
        spec=spec,
        records=records,
        texts=[data.text(r.query_key) for r in records],
        sentences=[data.sentence(r.query_key) for r in records] if data.sentences is not None else None,
    )


def iter_videos(
    data: SplitData, windows: WindowConfig, records: Sequence[QueryRecord] | None = None
) -> Iterator[VideoItem]:
    """Group the split's queries by video and yield one :class:`VideoItem` per video (features read once), its
    windows cut by the ``windows`` section."""
    spec = WindowSpec.from_config(windows, data.fps)
    by_video: dict[str, list[QueryRecord]] = {}
    for rec in records if records is not None else data.records:
        by_video.setdefault(rec.video_key, []).append(rec)
    for key, recs in by_video.items():
        yield video_item(data, spec, key, recs)
