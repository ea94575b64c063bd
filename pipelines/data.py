"""Ray Data: the training steps of every Ray Train worker, and the evaluation stream of batch inference
(:func:`build_eval_dataset`: one video with all its windows and queries per row, predicted by actors that hold the
model).

**Training: each worker receives exactly its part of each global step.**  The epoch's global batches are a seeded
function of (seed, epoch) (``rgnet.data.samples.epoch_plan``), shared with ``rgnet train --local``.  Each worker
builds one streaming dataset of its own for the rest of its run (:class:`WorkerSteps`): one row per (epoch, global
step), mapped by Ray Data tasks (at most ``ray.data_workers`` at a time, ``ray.data_cpus`` CPUs each, on any node)
that read the worker's B/N queries of that step: each query's drawn positive window (one HDF5 hyperslab), its text,
hinge frames, negative window and stream keys (``rgnet.data.samples.read_shard``), collated into arrays.  Rows come
back in (epoch, step) order (``preserve_order``), several steps per task (:func:`steps_per_block`, bounded in bytes)
and read ahead while the worker computes or validates; nothing is materialised, so memory is bounded by the blocks in
flight.  The other workers' positive windows of a step arrive inside the step, by ``all_gather``
(``rgnet.train.loop.train_step``).  A restarted worker group builds its dataset from the epoch it resumes at.

Why not one dataset split across workers: a split assigns rows to workers dynamically, so it cannot route "rank r's
part of step t" to rank r; and reading each video once per epoch (the previous design) means holding a video's
windows until its queries' batches come up, or giving up random batches across videos.  Per-step reads of the drawn
windows are the local loader's reads, in bounded memory.  The map tasks keep the split's HDF5 handles per process
(:func:`read_step`).

Glossary (``rgnet`` package docstring): B global batch, R workers, B_r = B / R, Lv frames per window, Dv / Dt video /
text widths, Lq words.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from rgnet.config import Config, from_dict, to_dict
from rgnet.data.dataset import SplitData, open_split
from rgnet.data.samples import WindowSpec, epoch_plan, read_shard

if TYPE_CHECKING:
    import ray.data


def video_table(data: SplitData) -> list[dict[str, Any]]:
    """One row per video: {"video_key", "query_ids"}; the order is the annotation order (deterministic)."""
    by_video: dict[str, list[str]] = {}
    for rec in data.records:
        by_video.setdefault(rec.video_key, []).append(rec.query_id)
    return [{"video_key": k, "query_ids": v} for k, v in by_video.items()]


class StepReader:
    """What a map task needs to read steps of one split: the open split (HDF5 handles opened on first read), the
    window geometry and the last epoch's plan.  Built once per Ray worker process and cached (:func:`read_step`)."""

    def __init__(self, cfg: dict[str, Any], split: str) -> None:
        self.cfg = from_dict(cfg)
        self.data = open_split(self.cfg.data, split)
        self.spec = WindowSpec.from_config(self.cfg.windows, self.data.fps)
        self._plan: tuple[int, np.ndarray] | None = None

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            t = self.cfg.train
            self._plan = (epoch, epoch_plan(len(self.data.records), t.batch_size, t.seed, epoch, t.max_steps_per_epoch))
        return self._plan[1]

    def __call__(self, step: int, epoch: int, rank: int, world: int) -> dict[str, Any]:
        shard = read_shard(
            self.data, self.spec, self.cfg.train, self.cfg.loss, self.plan(epoch), epoch, step, rank, world
        )
        # text_mask travels as lengths (a bool tensor column is not needed); the worker rebuilds it
        out: dict[str, Any] = {k: v.numpy() for k, v in shard.items() if k != "text_mask"}
        out["text_len"] = shard["text_mask"].sum(dim=1).numpy()
        out["step"] = np.int64(step)
        return out


# Per worker process: (config as JSON, split) -> its open reader (map tasks reuse their worker processes across
# executions, so a dataset starts no process and imports nothing after the first).
_READERS: dict[tuple[str, str], StepReader] = {}

BLOCK_BYTES = 32 * 2**20  # target size of one block of steps (one map task's output)


def read_step(row: dict[str, Any], cfg: dict[str, Any], split: str, rank: int, world: int) -> dict[str, Any]:
    """Ray Data map task: rank ``rank``'s part of global step ``row["step"]`` of epoch ``row["epoch"]``, as arrays."""
    key = (json.dumps(cfg, sort_keys=True), split)
    reader = _READERS.get(key)
    if reader is None:
        reader = _READERS[key] = StepReader(cfg, split)
    out = reader(int(row["step"]), int(row["epoch"]), rank, world)
    out["epoch"] = np.int64(row["epoch"])
    return out


def steps_per_block(cfg: Config, world: int, video_dim: int, window: int) -> int:
    """Steps per map task: as many as fit ``BLOCK_BYTES`` of window features (several steps per task amortise
    Ray's per-task and per-block costs; a bounded block keeps MAD-size windows within the memory budget)."""
    windows = cfg.train.batch_size // world * (2 if cfg.loss.negatives in ("same_video", "both") else 1)
    return max(1, BLOCK_BYTES // max(1, windows * window * video_dim * 4))


def steps_dataset(cfg: Config, split: str, epochs: range, rank: int, world: int, num_steps: int) -> ray.data.Dataset:
    """The streaming dataset of rank ``rank``'s parts of the first ``num_steps`` global steps of every epoch in
    ``epochs``, in (epoch, step) order."""
    import ray.data

    from rgnet.data.dataset import open_split

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in step order, whichever task finishes first
    ctx.enable_progress_bars = False
    data = open_split(cfg.data, split)  # metadata only: the window size in frames
    per_block = steps_per_block(cfg, world, cfg.data.video_dim, WindowSpec.from_config(cfg.windows, data.fps).length)
    data.close()
    rows = [{"epoch": e, "step": t} for e in epochs for t in range(num_steps)]
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_block))).map(
        read_step,
        fn_kwargs={"cfg": to_dict(cfg), "split": split, "rank": rank, "world": world},
        compute=ray.data.TaskPoolStrategy(size=max(1, cfg.ray.data_workers)),
        num_cpus=cfg.ray.data_cpus,
    )


def shard_from_row(block: dict[str, np.ndarray], i: int) -> dict[str, Tensor]:
    """Row ``i`` of a block of :func:`steps_dataset` (numpy) -> the rank's step part (``collate_shard`` schema)."""
    skip = ("epoch", "step", "text_len")
    out = {k: torch.from_numpy(np.array(v[i])) for k, v in block.items() if k not in skip}  # a writable copy
    lengths = torch.from_numpy(np.array(block["text_len"][i]))
    out["text_mask"] = torch.arange(out["text"].shape[1])[None, :] < lengths[:, None]
    return out


class WorkerSteps:
    """Rank ``rank``'s parts of the global steps of epochs ``first_epoch`` .. ``end_epoch - 1``, from one streaming
    dataset for the whole run (one executor start, read-ahead across epoch boundaries while the worker validates).

    :meth:`epoch` must be called for the epochs in order (what ``rgnet.train.loop.fit`` does); it checks that the
    rows it hands out are the epoch's steps in order.
    """

    def __init__(
        self, cfg: Config, split: str, first_epoch: int, end_epoch: int, rank: int, world: int, num_steps: int
    ) -> None:
        self.first_epoch, self.num_steps = first_epoch, num_steps
        self.dataset = steps_dataset(cfg, split, range(first_epoch, end_epoch), rank, world, num_steps)
        self._rows: Iterator[dict[str, Tensor | int]] | None = None

    def _iter_rows(self) -> Iterator[dict[str, Tensor | int]]:
        for block in self.dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for i in range(len(block["step"])):
                yield {"epoch": int(block["epoch"][i]), "step": int(block["step"][i]), **shard_from_row(block, i)}

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        if self._rows is None:
            self._rows = self._iter_rows()
        for expected in range(self.num_steps):
            row = next(self._rows, None)
            if row is None or (row["epoch"], row["step"]) != (epoch, expected):
                got = "nothing" if row is None else f"epoch {row['epoch']} step {row['step']}"
                raise RuntimeError(f"Ray Data delivered {got} where epoch {epoch} step {expected} was due")
            yield {k: v for k, v in row.items() if k not in ("epoch", "step")}  # type: ignore[misc]

    def close(self) -> None:
        """Stop reading (a stream left open would be torn down after Ray shuts down, noisily)."""
        if self._rows is not None:
            self._rows.close()  # type: ignore[attr-defined]
            self._rows = None

    def __enter__(self) -> WorkerSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

        from rgnet.train.checkpoint import model_with_overrides
        from rgnet.train.loop import resolve_device

        torch.set_num_threads(max(1, num_threads))
        payload = ray.get(payload_ref[0])  # wrapped in a list so that Ray hands over the reference, not a copy
        self.model, self.cfg = model_with_overrides(payload, overrides)
        self.device = resolve_device(self.cfg.train.device)
        self.model.to(self.device).eval()
        self.data = open_split(self.cfg.data, split)
        self.by_id = {r.query_id: r for r in self.data.records}
        self.timeline_ids = set(timeline_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rgnet.data.samples import video_item
        from rgnet.eval.inference import infer_video, window_rows

        spec = WindowSpec.from_config(self.cfg.windows, self.data.fps)
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
