"""Training and evaluation samples: from query records and feature stores to model batches.

A *training item* is one query with one sampled positive window (plus, for same-video negatives, one window of the
same video that does not overlap the moment), the GT clipped to that window and one in-moment / out-of-moment frame
pair for the sampling hinge (Eq. 6).  Reading and sampling are split: :func:`train_candidates` reads what a query's
items are drawn from (its positive windows, once), :func:`sample_train_item` draws the epoch's item with a generator
seeded by (seed, epoch, query id), so a resumed or re-sharded run draws the same samples.  The local loader calls
both in turn; the Ray Data pipeline reads candidates in its map stage (one video at a time) and samples in the
train worker.

An *evaluation item* is a video with all its windows and every query about it: the encoder runs on every
(window, query) pair of the video, the decoder on the top-k windows per query only (rgnet.eval.inference).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rgnet.config import Config
from rgnet.data.dataset import SplitData
from rgnet.data.records import QueryRecord
from rgnet.data.windows import clip_to_window_cw, positive_windows, window_bounds, window_frames


@dataclass(frozen=True)
class WindowSpec:
    """Window geometry in frames for one dataset (fps fixed per dataset)."""

    length: int  # W
    stride: int  # S
    fps: float

    @classmethod
    def from_config(cls, cfg: Config, fps: float) -> WindowSpec:
        length, stride = window_frames(cfg.windows.length_sec, cfg.windows.stride_sec, fps)
        return cls(length, stride, fps)


def item_rng(seed: int, epoch: int, query_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, query): the draw is independent of sharding and order."""
    return np.random.default_rng([seed, epoch, zlib.crc32(query_id.encode())])


def train_candidates(
    data: SplitData,
    record: QueryRecord,
    spec: WindowSpec,
    *,
    seed: int,
    need_negative: bool,
    frames: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Everything a query's training items are sampled from, read once (deterministic).

    ``windows`` (n, W, Dv) are the n positive windows (those overlapping the moment), zero-padded, with their valid
    lengths, the GT clipped to each as (center, width), a sampling weight proportional to the overlap and the
    window-relative in-moment frame range [in_lo, in_hi) for the hinge.  With ``need_negative`` one window of the same
    video that does not overlap the moment is drawn once per query (seeded by (seed, query id)); a query whose
    moment overlaps every window has none (``neg_len`` 0).  ``frames`` (the whole video, when the caller has read it
    already) avoids re-reading slices.
    """
    num_frames = data.num_frames(record.video_key) if frames is None else len(frames)
    bounds = window_bounds(num_frames, spec.length, spec.stride)  # (P, 2) frames [start, stop)
    start_f = min(record.start_sec * spec.fps, num_frames)
    end_f = min(record.end_sec * spec.fps, num_frames)
    pos = positive_windows(bounds, start_f, end_f)
    if len(pos) == 0:  # only possible for a moment past the features' end; readers reject those
        raise ValueError(f"query {record.query_id}: no window overlaps the moment [{record.start_sec}, {record.end_sec}] s")

    def read(w: int) -> np.ndarray:
        a, b = int(bounds[w, 0]), int(bounds[w, 1])
        chunk = frames[a:b] if frames is not None else data.video_slice(record.video_key, a, b)
        return _padded(chunk, spec.length)

    # The released code favours the middle positive window with a Gaussian on window ids; weighting by overlap keeps
    # the sliver windows that barely touch the moment rare without that arbitrary shape (a deliberate deviation).
    overlap = np.minimum(bounds[pos, 1], max(end_f, start_f + 1e-3)) - np.maximum(bounds[pos, 0], start_f)
    lens = (bounds[pos, 1] - bounds[pos, 0]).astype(np.int64)
    spans = np.array([clip_to_window_cw(start_f, end_f, int(bounds[w, 0]), int(bounds[w, 1])) for w in pos])
    in_lo = np.clip(np.floor(start_f) - bounds[pos, 0], 0, lens - 1).astype(np.int64)
    in_hi = np.clip(np.ceil(end_f) - bounds[pos, 0], in_lo + 1, lens).astype(np.int64)
    out = {
        "windows": np.stack([read(int(w)) for w in pos]),
        "window_len": lens,
        "spans_cw": spans.astype(np.float32).reshape(-1, 2),
        "weight": np.clip(overlap, 1e-3, None).astype(np.float64),
        "in_lo": in_lo,
        "in_hi": in_hi,
        "text": data.text(record.query_key),
    }
    if need_negative:
        others = np.setdiff1d(np.arange(len(bounds)), pos)
        if len(others):
            n = int(np.random.default_rng([seed, zlib.crc32(record.query_id.encode())]).choice(others))
            out["neg_video"], out["neg_len"] = read(n), np.int64(bounds[n, 1] - bounds[n, 0])
        else:
            out["neg_video"], out["neg_len"] = np.zeros_like(out["windows"][0]), np.int64(0)
    if data.sentences is not None:
        out["sentence"] = data.sentence(record.query_key)
    return out


def sample_train_item(cand: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One training item from a query's candidates: a positive window (by overlap weight) and a hinge frame pair."""
    weight = np.asarray(cand["weight"], dtype=np.float64)
    k = int(rng.choice(len(weight), p=weight / weight.sum()))
    valid = int(cand["window_len"][k])
    in_lo, in_hi = int(cand["in_lo"][k]), int(cand["in_hi"][k])
    in_frame = int(rng.integers(in_lo, in_hi))
    outside = np.concatenate([np.arange(0, in_lo), np.arange(in_hi, valid)])
    out_frame = int(rng.choice(outside)) if len(outside) else in_frame  # no outside frame: the hinge is constant
    item = {
        "video": cand["windows"][k],
        "video_len": np.int64(valid),
        "text": cand["text"],
        "span_cw": np.asarray(cand["spans_cw"][k], dtype=np.float32),
        "in_frame": np.int64(in_frame),
        "out_frame": np.int64(out_frame),
    }
    for key in ("neg_video", "neg_len", "sentence"):
        if key in cand:
            item[key] = cand[key]
    return item


def make_train_item(
    data: SplitData, record: QueryRecord, spec: WindowSpec, rng: np.random.Generator, *, seed: int, need_negative: bool
) -> dict[str, np.ndarray]:
    """One query, one positive window sampled with ``rng``: :func:`train_candidates` + :func:`sample_train_item`."""
    return sample_train_item(train_candidates(data, record, spec, seed=seed, need_negative=need_negative), rng)


def _padded(frames: np.ndarray, length: int) -> np.ndarray:
    """(T', Dv) -> (length, Dv) with zero rows after the valid frames."""
    out = np.zeros((length, frames.shape[1]), dtype=np.float32)
    out[: len(frames)] = frames
    return out


def _mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size)[None, :] < lengths[:, None]  # (n, size) True = valid


def pad_texts(texts: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """List of (L_i, Dt) -> (B, Lq, Dt) zero-padded, (B, Lq) bool mask."""
    lq = max(len(t) for t in texts)
    out = torch.zeros(len(texts), lq, texts[0].shape[1])
    for i, t in enumerate(texts):
        out[i, : len(t)] = torch.from_numpy(np.asarray(t))
    lengths = torch.tensor([len(t) for t in texts])
    return out, _mask(lengths, lq)


def collate_train(items: Sequence[dict[str, np.ndarray]], negatives: str) -> dict[str, Tensor]:
    """Stack items into a model batch and lay out the (query, window) pairs for the chosen negatives.

    Windows: [B positive windows; then the same-video negative windows (same_video / both)].
    """
    from rgnet.model import build_pairs

    b = len(items)
    video = torch.from_numpy(np.stack([it["video"] for it in items]))  # (B, Lv, Dv)
    lengths = torch.tensor([int(it["video_len"]) for it in items])
    neg_window = torch.full((b,), -1, dtype=torch.long)
    if negatives in ("same_video", "both"):
        neg_lengths = torch.tensor([int(it["neg_len"]) for it in items])
        has_neg = neg_lengths > 0
        neg_video = torch.from_numpy(np.stack([it["neg_video"] for it in items]))[has_neg]
        video = torch.cat([video, neg_video])  # (B + B', Lv, Dv)
        lengths = torch.cat([lengths, neg_lengths[has_neg]])
        neg_window[has_neg] = b + torch.arange(int(has_neg.sum()))
    text, text_mask = pad_texts([it["text"] for it in items])
    pair_window, pair_text, positive_pair = build_pairs(b, negatives, neg_window)
    batch = {
        "video": video,
        "video_mask": _mask(lengths, video.shape[1]),
        "text": text,
        "text_mask": text_mask,
        "span_cw": torch.from_numpy(np.stack([it["span_cw"] for it in items])),
        "in_frame": torch.tensor([int(it["in_frame"]) for it in items]),
        "out_frame": torch.tensor([int(it["out_frame"]) for it in items]),
        "neg_window": neg_window,
        "pair_window": pair_window,
        "pair_text": pair_text,
        "positive_pair": positive_pair,
    }
    if "sentence" in items[0]:
        batch["sentence"] = torch.from_numpy(np.stack([it["sentence"] for it in items]))
    return batch


class TrainBatches:
    """Seeded, shuffled training batches for one epoch, read lazily from the feature stores (one process)."""

    def __init__(self, data: SplitData, cfg: Config, *, rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.cfg = cfg
        self.spec = WindowSpec.from_config(cfg, data.fps)
        self.rank, self.world_size = rank, world_size
        self.need_negative = cfg.loss.negatives in ("same_video", "both")

    def num_batches(self) -> int:
        per_rank = len(self.data.records) // self.world_size
        n = per_rank // self.cfg.train.batch_size  # the last partial batch is dropped (in-batch negatives need B)
        if self.cfg.train.max_steps_per_epoch:
            n = min(n, self.cfg.train.max_steps_per_epoch)
        return n

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self.data.records))
        order = order[self.rank :: self.world_size]
        bs = self.cfg.train.batch_size
        for i in range(self.num_batches()):
            items = []
            for j in order[i * bs : (i + 1) * bs]:
                rec = self.data.records[int(j)]
                rng = item_rng(self.cfg.train.seed, epoch, rec.query_id)
                items.append(
                    make_train_item(
                        self.data, rec, self.spec, rng, seed=self.cfg.train.seed, need_negative=self.need_negative
                    )
                )
            yield collate_train(items, self.cfg.loss.negatives)


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


def gather_windows(frames: Tensor, bounds: np.ndarray, length: int, which: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Windows ``which`` (default all) of a video: (T, Dv) -> (P', W, Dv) zero-padded and (P', W) bool mask.

    One index gather, no Python loop over windows; only the requested windows are materialised, so the caller
    bounds memory by asking for chunks.
    """
    b = torch.from_numpy(bounds) if which is None else torch.from_numpy(bounds)[which]
    idx = b[:, :1] + torch.arange(length)[None, :]  # (P', W) frame index
    mask = idx < b[:, 1:2]
    windows = frames[idx.clamp(max=frames.shape[0] - 1)]  # (P', W, Dv)
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


def iter_videos(data: SplitData, cfg: Config, records: Sequence[QueryRecord] | None = None) -> Iterator[VideoItem]:
    """Group the split's queries by video and yield one :class:`VideoItem` per video (features read once)."""
    spec = WindowSpec.from_config(cfg, data.fps)
    by_video: dict[str, list[QueryRecord]] = {}
    for rec in records if records is not None else data.records:
        by_video.setdefault(rec.video_key, []).append(rec)
    for key, recs in by_video.items():
        yield video_item(data, spec, key, recs)
