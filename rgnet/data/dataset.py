"""The entry point for reading a dataset split: ``open_split(cfg.data, "train")`` -> :class:`SplitData`.

A split is its annotation records plus lazy feature stores (``rgnet.data.features``); the layouts themselves are
described in ``rgnet.data.formats``.  Opening a split checks everything that is cheap to check up front, so that a
bad dataset fails at start-up with a message naming the file, the record and the field, rather than hours into
training: every record's video and query exist in the feature files, every video's features have the configured
width, and each annotated duration agrees with the number of frames at the feature rate.  Feature values (NaN/Inf)
are checked when read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from rgnet.config import ConfigError, DataConfig
from rgnet.data.features import FeatureStore, HDF5Store, PtDirStore, nearest_key
from rgnet.data.formats import (
    DEFAULT_FPS,
    DEFAULT_PATHS,
    DURATION_FIELD,
    NATIVE_GROUPS,
    QUERY_KEY_FIELD,
    VIDEO_FIELD,
    check_layout,
    read_ego4d,
    read_mad,
    read_native,
)
from rgnet.data.records import DataError, QueryRecord

log = logging.getLogger(__name__)

DURATION_SLACK_SEC = 1.0  # allowed |duration - T / fps| beyond one frame (feature extractors round the last clip)


def default_paths(layout: str) -> dict[str, str]:
    """The layout's default file names (keys annotations, video_features, text_features, sentence_features)."""
    check_layout(layout)
    return dict(DEFAULT_PATHS[layout])


def read_annotations(
    layout: str,
    path: str | Path,
    *,
    mad_gt_field: str = "timestamps",
    drop_zero_length: bool = True,
) -> tuple[list[QueryRecord], dict[str, int]]:
    """Read one annotation file strictly; returns the records in file order and the skipped rows per reason.

    ``drop_zero_length`` removes moments with start == end (about 14% of Ego4D-NLQ; they cannot be grounded by a
    span model) and counts them as ``zero_length``.  Every skip is logged as a warning with its count.
    """
    check_layout(layout)
    if layout == "mad":
        if mad_gt_field not in ("timestamps", "ext_timestamps"):
            raise ValueError(f"mad_gt_field must be 'timestamps' or 'ext_timestamps', got {mad_gt_field!r}")
        records, dropped = read_mad(path, gt_field=mad_gt_field)
    elif layout == "ego4d":
        records, dropped = read_ego4d(path)
    else:
        records, dropped = read_native(path)
    if drop_zero_length:
        kept = [r for r in records if r.end_sec != r.start_sec]
        if len(kept) != len(records):
            dropped = {**dropped, "zero_length": len(records) - len(kept)}
        records = kept
    for reason, count in dropped.items():
        if reason == "zero_length":
            log.warning("%s: dropped %d zero-length ground-truth moments (data.drop_zero_length=true)", path, count)
        else:
            log.warning("%s: skipped %d language queries without a 'query' text", path, count)
    return records, dropped


@dataclass
class SplitData:
    """One split: records plus lazy feature stores. Picklable (stores reopen their files in the new process)."""

    layout: str
    split: str
    root: Path
    annotation_path: Path
    records: list[QueryRecord]
    videos: FeatureStore
    texts: FeatureStore
    sentences: FeatureStore | None
    fps: float
    dropped: dict[str, int]  # rows filtered per reason (zero_length, no_query), also logged as warnings
    max_query_tokens: int
    normalize_text: bool

    def num_frames(self, video_key: str) -> int:
        return self.videos.num_frames(video_key)

    def video(self, video_key: str) -> np.ndarray:
        """All frames, (T, Dv) float32."""
        return self.videos.get(video_key)

    def video_slice(self, video_key: str, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop), (stop - start, Dv) float32; only these rows are read."""
        return self.videos.get_slice(video_key, start, stop)

    def text_length(self, query_key: str) -> int:
        """Tokens that :meth:`text` returns for this query (metadata only)."""
        return min(self.texts.num_frames(query_key), self.max_query_tokens)

    def text(self, query_key: str) -> np.ndarray:
        """Token features (Lq, Dt) float32: the first ``max_query_tokens`` tokens, each L2-normalised if asked
        (the released code normalises tokens, then truncates; per-token normalisation makes the order irrelevant)."""
        tokens = self.texts.get_slice(query_key, 0, self.text_length(query_key))  # (Lq, Dt)
        if self.normalize_text:
            norms = np.linalg.norm(tokens, axis=1, keepdims=True)  # (Lq, 1)
            tokens = tokens / np.maximum(norms, np.float32(1e-12))  # an all-zero token stays zero
        return tokens.astype(np.float32, copy=False)

    def sentence(self, query_key: str) -> np.ndarray:
        """The query's sentence feature (Dv,) float32 in the video tower's space (used by frozen-feature ranking)."""
        if self.sentences is None:
            raise DataError(
                self.root,
                "this split has no sentence features",
                record=query_key,
                field="sentence_features",
                fix="provide the sentence feature file (data.sentence_features), or use a model that does not need it",
            )
        return self.sentences.get(query_key)

    def close(self) -> None:
        for store in (self.videos, self.texts, self.sentences):
            if store is not None:
                store.close()


# ---------------------------------------------------------------------------------------------------------------
# open_split and its steps
# ---------------------------------------------------------------------------------------------------------------
def _file_names(cfg: DataConfig, split: str) -> dict[str, tuple[Path, bool]]:
    """name -> (path under root, whether the config named it explicitly)."""
    root = Path(cfg.root)
    out = {}
    for key, default in DEFAULT_PATHS[cfg.layout].items():
        given = str(getattr(cfg, key))
        out[key] = (root / (given or default).replace("{split}", split), bool(given))
    return out


def _stores(
    cfg: DataConfig, names: dict[str, tuple[Path, bool]]
) -> tuple[FeatureStore, FeatureStore, FeatureStore | None]:
    native = cfg.layout == "native"

    def h5(key: str, dim: int, rank: int, kind: str) -> HDF5Store:
        return HDF5Store(names[key][0], group=NATIVE_GROUPS[key] if native else None, dim=dim, rank=rank, kind=kind)

    video_path = names["video_features"][0]
    videos: FeatureStore
    if cfg.layout == "ego4d" and video_path.suffix != ".h5":
        videos = PtDirStore(video_path, dim=cfg.video_dim, kind="video")
    else:
        videos = h5("video_features", cfg.video_dim, 2, "video")
    texts = h5("text_features", cfg.text_dim, 2, "text")

    # Sentence features are optional: absent under the default name means "none"; a name given in the config must
    # exist (a missing file or group then fails in _check_keys with the store's own message).
    sentence_path, explicit = names["sentence_features"]
    sentences = h5("sentence_features", cfg.video_dim, 1, "sentence")
    if not explicit and (not sentence_path.is_file() or not sentences.has_group()):
        sentences.close()
        return videos, texts, None
    return videos, texts, sentences


def _resolve_fps(cfg: DataConfig, videos: FeatureStore) -> float:
    """Feature rate: data.fps if set, else the layout default (MAD, Ego4D) or the file's ``fps`` attribute (native).

    The writers store ``fps`` in HDF5 video files; when it disagrees with the rate in use, every second-to-frame
    conversion would be wrong, so that is an error rather than a silent choice.
    """
    stored = videos.file_attrs().get("fps") if isinstance(videos, HDF5Store) else None
    fps = cfg.fps if cfg.fps > 0 else DEFAULT_FPS.get(cfg.layout, stored)
    if fps is None:
        raise DataError(
            videos.path,
            "no 'fps' file attribute, and data.fps is 0",
            field="fps",
            fix="set data.fps to the feature rate, or store it as the file attribute 'fps'",
        )
    fps = float(fps)
    if stored is not None and not math.isclose(float(stored), fps, rel_tol=1e-6):
        source = "data.fps" if cfg.fps > 0 else f"the {cfg.layout} default"
        raise DataError(
            videos.path,
            f"the file says its features are at {float(stored):g} fps, but {source} is {fps:g}",
            field="fps",
            fix=f"set data.fps={float(stored):g} (or fix the file attribute)",
        )
    return fps


def _check_keys(
    records: list[QueryRecord],
    annotation_path: Path,
    layout: str,
    videos: FeatureStore,
    texts: FeatureStore,
    sentences: FeatureStore | None,
) -> None:
    _check_store_has(records, annotation_path, videos, "video", VIDEO_FIELD[layout])
    for store in (texts, sentences):
        if store is not None:
            _check_store_has(records, annotation_path, store, "query", QUERY_KEY_FIELD[layout])


def _check_store_has(
    records: list[QueryRecord], annotation_path: Path, store: FeatureStore, key: Literal["video", "query"], field: str
) -> None:
    """Every record's video key (``key="video"``) or query key is in ``store``, else an error naming the first
    record without one, the annotation ``field`` it comes from and the nearest key the store has."""
    keys = set(store.keys())
    for rec in records:
        wanted = rec.video_key if key == "video" else rec.query_key
        if wanted not in keys:
            near = nearest_key(wanted, sorted(keys))
            if key == "video":
                problem = f"unknown video id {wanted!r}: not in {store.path}"
            else:
                problem = f"query {wanted!r} has no {store.kind} features in {store.path}"
            raise DataError(
                annotation_path,
                f"{problem} (nearest: {near!r})",
                record=rec.query_id,
                field=field,
                fix=f"check that annotations and {key} features come from the same release",
            )


def _check_durations(
    records: list[QueryRecord], annotation_path: Path, layout: str, videos: FeatureStore, fps: float
) -> None:
    frames = {key: videos.num_frames(key) for key in dict.fromkeys(r.video_key for r in records)}  # also checks shapes
    for rec in records:
        feature_sec = frames[rec.video_key] / fps
        if abs(rec.duration_sec - feature_sec) > 1.0 / fps + DURATION_SLACK_SEC:
            raise DataError(
                annotation_path,
                f"video duration {rec.duration_sec:g} s disagrees with its features: {frames[rec.video_key]} frames "
                f"at {fps:g} fps = {feature_sec:g} s",
                record=rec.query_id,
                field=DURATION_FIELD[layout],
                fix="check data.fps and that the features belong to this video",
            )


def open_split(cfg: DataConfig, split: str) -> SplitData:
    """Open one split of the dataset described by ``cfg`` (file names with ``{split}`` substituted).

    Reads the annotations strictly, opens the feature stores lazily and checks the records against them (see the
    module docstring).  Raises :class:`DataError` naming file, record and field on any inconsistency.
    """
    check_layout(cfg.layout)
    if cfg.text_encoder:
        from rgnet.text import TEXT_ENCODER_DIMS

        if cfg.text_dim != TEXT_ENCODER_DIMS[cfg.text_encoder]:
            raise ConfigError(
                f"data.text_encoder={cfg.text_encoder} gives {TEXT_ENCODER_DIMS[cfg.text_encoder]}-d token features: "
                f"set data.text_dim={TEXT_ENCODER_DIMS[cfg.text_encoder]} (it is {cfg.text_dim})"
            )
    names = _file_names(cfg, split)
    annotation_path = names["annotations"][0]
    records, dropped = read_annotations(
        cfg.layout, annotation_path, mad_gt_field=cfg.mad_gt_field, drop_zero_length=cfg.drop_zero_length
    )
    videos, texts, sentences = _stores(cfg, names)
    if cfg.text_encoder:  # token features computed from the sentences (rgnet.text), cached beside the data
        from rgnet.data.features import EncodedTextStore
        from rgnet.text import cache_path, encoded_text_file

        texts.close()
        pairs = [(r.query_key, r.query) for r in records]
        cache = encoded_text_file(cfg.text_encoder, pairs, cache_path(cfg.root, cfg.text_encoder, split))
        texts = EncodedTextStore(cache, dim=cfg.text_dim)
    try:
        fps = _resolve_fps(cfg, videos)
        _check_keys(records, annotation_path, cfg.layout, videos, texts, sentences)
        _check_durations(records, annotation_path, cfg.layout, videos, fps)
    except BaseException:
        for store in (videos, texts, sentences):  # a rejected dataset leaves no open handles behind
            if store is not None:
                store.close()
        raise
    return SplitData(
        layout=cfg.layout,
        split=split,
        root=Path(cfg.root),
        annotation_path=annotation_path,
        records=records,
        videos=videos,
        texts=texts,
        sentences=sentences,
        fps=fps,
        dropped=dropped,
        max_query_tokens=cfg.max_query_tokens,
        normalize_text=cfg.normalize_text,
    )
