"""The three on-disk dataset layouts (DESIGN.md section 2): strict annotation readers and deterministic writers.

Layouts and their default file names (``{split}`` is replaced by the split name; every name is relative to the
dataset root and can be changed in ``DataConfig``):

* ``mad`` (the official MAD release): ``MAD_{split}.json``, a dict keyed by annotation id with ``movie``,
  ``sentence``, ``timestamps`` [s, e], ``ext_timestamps`` [s, e] and ``movie_duration``; frame features
  ``CLIP_B32_frames_features_5fps.h5`` (key = movie, (T, Dv)); token features ``CLIP_B32_language_tokens_features.h5``
  (key = annotation id, (L, Dt)); optional sentence features ``CLIP_B32_sentence_features.h5`` (key = annotation id,
  (Dv,)).  5 fps.
* ``ego4d`` (the official Ego4D-NLQ release): ``nlq_{split}.json`` (videos -> clips -> annotations ->
  language_queries); query id ``<annotation_uid>_<index in language_queries>``; video id = ``clip_uid``; duration =
  the clip's ``clip_end_sec - clip_start_sec``.  Video features: a folder ``egovlp/`` of ``<clip_uid>.pt`` (T, 256)
  tensors, or one HDF5 file when the configured name ends in ``.h5``; ``token_features.h5`` (key = query id);
  optional ``sentence_features.h5``.  1.875 fps (one EgoVLP feature per 16 frames at 30 fps).
* ``native`` (this project's format for custom datasets): ``{split}.jsonl`` (or ``{split}.parquet``) with columns
  ``query_id, video_id, query, start_sec, end_sec, duration_sec``; one ``features.h5`` with ``videos/<video_id>``
  (T, Dv), ``queries/<query_id>`` (L, Dt), optional ``sentences/<query_id>`` (Dv,) and file attributes ``fps``,
  ``video_feature_name``, ``text_feature_name``.

Readers reject rather than repair: every problem is a :class:`~rgnet.data.records.DataError` naming the file, the
record (query id, or line/row) and the field.  Writers produce byte-identical files for identical inputs (sorted
HDF5 keys, no HDF5 timestamps, a fixed HDF5 format version, stable JSON key order) and write each file under a
temporary name that is renamed only when complete.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rgnet.data.records import DataError, QueryRecord
from rgnet.io import atomic_path, atomic_write_json, atomic_write_jsonl

LAYOUTS = ("mad", "ego4d", "native")
DEFAULT_FPS = {"mad": 5.0, "ego4d": 1.875}  # native: the fps attribute of the feature file
DEFAULT_PATHS: dict[str, dict[str, str]] = {
    "mad": {
        "annotations": "MAD_{split}.json",
        "video_features": "CLIP_B32_frames_features_5fps.h5",
        "text_features": "CLIP_B32_language_tokens_features.h5",
        "sentence_features": "CLIP_B32_sentence_features.h5",
    },
    "ego4d": {
        "annotations": "nlq_{split}.json",
        "video_features": "egovlp",
        "text_features": "token_features.h5",
        "sentence_features": "sentence_features.h5",
    },
    "native": {
        "annotations": "{split}.jsonl",
        "video_features": "features.h5",
        "text_features": "features.h5",
        "sentence_features": "features.h5",
    },
}
NATIVE_GROUPS = {"video_features": "videos", "text_features": "queries", "sentence_features": "sentences"}
NATIVE_COLUMNS = ("query_id", "video_id", "query", "start_sec", "end_sec", "duration_sec")

# The annotation field that holds each QueryRecord attribute, per layout (error messages name these).
VIDEO_FIELD = {"mad": "movie", "ego4d": "clip_uid", "native": "video_id"}
DURATION_FIELD = {"mad": "movie_duration", "ego4d": "clip_end_sec", "native": "duration_sec"}
QUERY_KEY_FIELD = {"mad": "annotation id", "ego4d": "annotation_uid", "native": "query_id"}

END_SLACK_SEC = 1e-3  # float slack allowed on end_sec <= duration_sec
HDF5_LIBVER = ("earliest", "v110")  # fixed file-format bounds: same inputs -> same bytes with any HDF5 build


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


# ---------------------------------------------------------------------------------------------------------------
# Reading: shared field checks
# ---------------------------------------------------------------------------------------------------------------
class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a repeated key is an error (``json`` would silently keep the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_json(text: str, file: Path, record: str | None = None) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        raise DataError(
            file,
            f"key {dup.key!r} appears twice in one object (a duplicate query id, or a field given twice)",
            record=record or dup.key,
            fix="make every query id unique and give each field once",
        ) from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}" if record is None else f"column {err.colno}"
        problem = f"malformed JSON at {where}: {err.msg}"
        raise DataError(file, problem, record=record, fix="fix the JSON syntax") from None


def _read_text(file: Path, what: str) -> str:
    if not file.is_file():
        raise DataError(file, f"{what} file not found", fix="check data.root and data.annotations")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(file, f"cannot read the {what} file: {err}") from err


class _Fields:
    """Typed access to one annotation object; a missing field or a wrong type names file, record and field."""

    def __init__(self, file: Path, record: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise DataError(file, f"expected a JSON object, got {type(obj).__name__}", record=record)
        self.file, self.record, self.obj = file, record, obj

    def _get(self, name: str) -> Any:
        if name not in self.obj or self.obj[name] is None:
            raise DataError(self.file, "missing field", record=self.record, field=name)
        return self.obj[name]

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise DataError(
                self.file, f"expected a string, got {type(value).__name__} {value!r}", record=self.record, field=name
            )
        return value

    def number(self, name: str) -> float:
        return _as_number(self._get(name), self.file, self.record, name)

    def pair(self, name: str) -> tuple[float, float]:
        value = self._get(name)
        if not isinstance(value, list | tuple) or len(value) != 2:
            problem = f"expected [start, end] in seconds, got {value!r}"
            raise DataError(self.file, problem, record=self.record, field=name)
        return (
            _as_number(value[0], self.file, self.record, name),
            _as_number(value[1], self.file, self.record, name),
        )

    def items(self, name: str) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise DataError(self.file, f"expected a list, got {type(value).__name__}", record=self.record, field=name)
        return value


def _as_number(value: Any, file: Path, record: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(file, f"expected a number, got {type(value).__name__} {value!r}", record=record, field=name)
    if not math.isfinite(value):
        raise DataError(file, f"expected a finite number, got {value!r}", record=record, field=name)
    return float(value)


def _record(
    file: Path,
    *,
    query_id: str,
    video_id: str,
    query: str,
    start_sec: float,
    end_sec: float,
    duration_sec: float,
    fields: tuple[str, str, str, str],
) -> QueryRecord:
    """A checked record; ``fields`` names the (query, start, end, duration) fields of the layout for messages."""
    q_field, s_field, e_field, d_field = fields
    if not query.strip():
        raise DataError(file, "empty query text", record=query_id, field=q_field, fix="remove the row or add the query")
    if not video_id:
        raise DataError(file, "empty video id", record=query_id, fix="every query needs the id of its video")
    if duration_sec <= 0:
        raise DataError(file, f"video duration {duration_sec} s is not positive", record=query_id, field=d_field)
    if start_sec < 0:
        raise DataError(file, f"moment start {start_sec} s is negative", record=query_id, field=s_field)
    if end_sec < start_sec:
        raise DataError(
            file,
            f"moment end {end_sec} s is before its start {start_sec} s",
            record=query_id,
            field=e_field,
            fix="swap or correct the timestamps",
        )
    if end_sec > duration_sec + END_SLACK_SEC:
        raise DataError(
            file,
            f"moment end {end_sec} s is past the video duration {duration_sec} s",
            record=query_id,
            field=e_field,
            fix="clip the moment to the video or correct the duration",
        )
    return QueryRecord(
        query_id=query_id,
        video_id=video_id,
        query=query,
        start_sec=start_sec,
        end_sec=end_sec,
        duration_sec=duration_sec,
        video_key=video_id,
        query_key=query_id,
    )


def _check_unique(records: list[QueryRecord], file: Path, id_field: str) -> None:
    seen: set[str] = set()
    for rec in records:
        if rec.query_id in seen:
            fix = "query ids must be unique"
            raise DataError(file, "duplicate query id", record=rec.query_id, field=id_field, fix=fix)
        seen.add(rec.query_id)


# ---------------------------------------------------------------------------------------------------------------
# Reading: one function per layout -> (records in file order, skipped rows per reason)
# ---------------------------------------------------------------------------------------------------------------
def read_mad(path: str | os.PathLike[str], *, gt_field: str = "timestamps") -> tuple[list[QueryRecord], dict[str, int]]:
    """``MAD_{split}.json``: a dict keyed by annotation id (= query id = text feature key)."""
    file = Path(path)
    data = _parse_json(_read_text(file, "MAD annotation"), file)
    if not isinstance(data, dict):
        raise DataError(file, f"expected a JSON object keyed by annotation id, got {type(data).__name__}")
    records = []
    for qid, obj in data.items():
        f = _Fields(file, qid, obj)
        start, end = f.pair(gt_field)
        records.append(
            _record(
                file,
                query_id=qid,
                video_id=f.text("movie"),
                query=f.text("sentence"),
                start_sec=start,
                end_sec=end,
                duration_sec=f.number("movie_duration"),
                fields=("sentence", gt_field, gt_field, "movie_duration"),
            )
        )
    return records, {}


def read_ego4d(path: str | os.PathLike[str]) -> tuple[list[QueryRecord], dict[str, int]]:
    """``nlq_{split}.json`` in the official NLQ structure; query id ``<annotation_uid>_<index>``.

    An entry of ``language_queries`` without a ``query`` (the release has a few) is skipped and counted as
    ``no_query``, but still consumes its index, so ids match the official evaluator's.
    """
    file = Path(path)
    data = _parse_json(_read_text(file, "Ego4D-NLQ annotation"), file)
    top = _Fields(file, "top level", data)
    records: list[QueryRecord] = []
    skipped = 0
    for v, video in enumerate(top.items("videos")):
        fv = _Fields(file, f"videos[{v}]", video)
        for c, clip in enumerate(fv.items("clips")):
            fc = _Fields(file, f"videos[{v}].clips[{c}]", clip)
            clip_uid = fc.text("clip_uid")
            fc.record = f"clip {clip_uid}"
            duration = fc.number("clip_end_sec") - fc.number("clip_start_sec")
            for a, ann in enumerate(fc.items("annotations")):
                fa = _Fields(file, f"clip {clip_uid}, annotations[{a}]", ann)
                uid = fa.text("annotation_uid")
                fa.record = f"annotation {uid}"
                for i, entry in enumerate(fa.items("language_queries")):
                    qid = f"{uid}_{i}"
                    if isinstance(entry, dict) and entry.get("query") is None:
                        skipped += 1
                        continue
                    fq = _Fields(file, qid, entry)
                    records.append(
                        _record(
                            file,
                            query_id=qid,
                            video_id=clip_uid,
                            query=fq.text("query"),
                            start_sec=fq.number("clip_start_sec"),
                            end_sec=fq.number("clip_end_sec"),
                            duration_sec=duration,
                            fields=("query", "clip_start_sec", "clip_end_sec", "clip_end_sec"),
                        )
                    )
    _check_unique(records, file, "annotation_uid")
    return records, ({"no_query": skipped} if skipped else {})


def read_native(path: str | os.PathLike[str]) -> tuple[list[QueryRecord], dict[str, int]]:
    """``{split}.jsonl`` (one JSON object per line) or ``{split}.parquet``, chosen by the file extension."""
    file = Path(path)
    rows: list[tuple[str, Any]]  # (label for messages, row object)
    if file.suffix == ".parquet":
        if not file.is_file():
            raise DataError(file, "annotation file not found", fix="check data.root and data.annotations")
        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowException) as err:
            raise DataError(file, f"cannot read as Parquet: {err}") from err
        for column in NATIVE_COLUMNS:
            if column not in table.column_names:
                fix = f"native columns: {', '.join(NATIVE_COLUMNS)}"
                raise DataError(file, "missing column", field=column, fix=fix)
        rows = [(f"row {i}", row) for i, row in enumerate(table.select(list(NATIVE_COLUMNS)).to_pylist())]
    else:
        rows = []
        for n, line in enumerate(_read_text(file, "annotation").splitlines(), start=1):
            if line.strip():
                rows.append((f"line {n}", _parse_json(line, file, record=f"line {n}")))
    records = []
    for label, row in rows:
        f = _Fields(file, label, row)
        qid = f.text("query_id")
        f.record = qid
        records.append(
            _record(
                file,
                query_id=qid,
                video_id=f.text("video_id"),
                query=f.text("query"),
                start_sec=f.number("start_sec"),
                end_sec=f.number("end_sec"),
                duration_sec=f.number("duration_sec"),
                fields=("query", "start_sec", "end_sec", "duration_sec"),
            )
        )
    _check_unique(records, file, "query_id")
    return records, {}


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def write_h5(
    path: str | os.PathLike[str],
    groups: Mapping[str | None, Mapping[str, np.ndarray]],
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """One HDF5 file: ``groups`` maps a group name (None = the file root) to {key: array}; float32, contiguous.

    Keys are written sorted and without modification times, so equal inputs give equal bytes.
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=HDF5_LIBVER) as f:
        for name, value in sorted((attrs or {}).items()):
            f.attrs[name] = value
        for group_name in sorted(groups, key=lambda g: "" if g is None else g):
            group = f if group_name is None else f.create_group(group_name)
            arrays = groups[group_name]
            for key in sorted(arrays):
                group.create_dataset(key, data=np.asarray(arrays[key], dtype=np.float32), track_times=False)


def write_pt(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """One tensor file (Ego4D per-clip features), serialised in memory first so its bytes do not depend on the
    temporary file name (``torch.save`` names the archive after the file)."""
    buf = io.BytesIO()
    torch.save(torch.from_numpy(np.array(array, dtype=np.float32, copy=True)), buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def write_native_annotations(path: str | os.PathLike[str], records: Sequence[QueryRecord]) -> None:
    """``.parquet`` by extension, JSON Lines otherwise; columns in :data:`NATIVE_COLUMNS` order."""
    rows = [
        {
            "query_id": r.query_id,
            "video_id": r.video_id,
            "query": r.query,
            "start_sec": float(r.start_sec),
            "end_sec": float(r.end_sec),
            "duration_sec": float(r.duration_sec),
        }
        for r in records
    ]
    if Path(path).suffix != ".parquet":
        atomic_write_jsonl(path, rows)
        return
    schema = pa.schema([(c, pa.string()) for c in NATIVE_COLUMNS[:3]] + [(c, pa.float64()) for c in NATIVE_COLUMNS[3:]])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)  # Parquet metadata carries no write time: equal tables give equal bytes


_QUERY_ID = re.compile(r"(.+)_(\d+)")


def _ego4d_json(records: Sequence[QueryRecord]) -> dict[str, Any]:
    """Group records back into the NLQ tree: one video per clip, one annotation per ``<uid>``, queries at ``index``."""
    clips: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}  # annotation uid -> clip
    for rec in records:
        m = _QUERY_ID.fullmatch(rec.query_id)
        if m is None:
            raise ValueError(f"ego4d query ids must look like '<annotation_uid>_<index>', got {rec.query_id!r}")
        uid, index = m.group(1), int(m.group(2))
        clip = clips.setdefault(rec.video_id, {"duration": rec.duration_sec, "annotations": {}})
        if clip["duration"] != rec.duration_sec:
            raise ValueError(
                f"clip {rec.video_id!r}: queries disagree on its duration ({clip['duration']} vs {rec.duration_sec})"
            )
        if owner.setdefault(uid, rec.video_id) != rec.video_id:
            raise ValueError(f"annotation {uid!r} has queries on two clips ({owner[uid]!r} and {rec.video_id!r})")
        slots: dict[int, QueryRecord] = clip["annotations"].setdefault(uid, {})
        if index in slots:
            raise ValueError(f"duplicate ego4d query id {rec.query_id!r}")
        slots[index] = rec
    videos = []
    for clip_uid, clip in clips.items():
        duration = float(clip["duration"])
        annotations = []
        for uid, slots in clip["annotations"].items():
            queries: list[dict[str, Any]] = [{} for _ in range(max(slots) + 1)]  # a gap = an entry without "query"
            for index, rec in slots.items():
                queries[index] = {
                    "clip_start_sec": float(rec.start_sec),
                    "clip_end_sec": float(rec.end_sec),
                    "video_start_sec": float(rec.start_sec),
                    "video_end_sec": float(rec.end_sec),
                    "query": rec.query,
                }
            annotations.append({"annotation_uid": uid, "language_queries": queries})
        clip_json = {
            "clip_uid": clip_uid,
            "video_start_sec": 0.0,
            "video_end_sec": duration,
            "clip_start_sec": 0.0,
            "clip_end_sec": duration,
            "annotations": annotations,
        }
        videos.append({"video_uid": clip_uid, "clips": [clip_json]})
    return {"version": "1", "videos": videos}


def _mad_json(records: Sequence[QueryRecord], ext: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in records:
        if rec.query_id in out:
            raise ValueError(f"duplicate MAD annotation id {rec.query_id!r}")
        ext_se = ext.get(rec.query_id, (rec.start_sec, rec.end_sec))
        out[rec.query_id] = {
            "movie": rec.video_id,
            "sentence": rec.query,
            "timestamps": [float(rec.start_sec), float(rec.end_sec)],
            "ext_timestamps": [float(ext_se[0]), float(ext_se[1])],
            "movie_duration": float(rec.duration_sec),
        }
    return out


def _check_writer_inputs(
    splits: Mapping[str, Sequence[QueryRecord]],
    videos: Mapping[str, np.ndarray],
    texts: Mapping[str, np.ndarray],
    sentences: Mapping[str, np.ndarray] | None,
    fps: float,
) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    for store, name in ((videos, "video"), (texts, "text"), (sentences or {}, "sentence")):
        for key in store:
            if not key or "/" in key or key.startswith("."):
                raise ValueError(f"{name} key {key!r} cannot name a feature (empty, has '/' or starts with '.')")
    for split, records in splits.items():
        for rec in records:
            if rec.video_key != rec.video_id or rec.query_key != rec.query_id:
                raise ValueError(
                    f"split {split!r}, query {rec.query_id!r}: the on-disk layouts key features by id, so video_key "
                    f"must equal video_id and query_key must equal query_id"
                )
            if rec.video_key not in videos:
                raise ValueError(f"split {split!r}, query {rec.query_id!r}: no video features for {rec.video_key!r}")
            if rec.query_key not in texts:
                raise ValueError(f"split {split!r}, query {rec.query_id!r}: no text features for {rec.query_key!r}")
            if sentences is not None and rec.query_key not in sentences:
                raise ValueError(f"split {split!r}, query {rec.query_id!r}: no sentence features")


def write_dataset(
    layout: str,
    root: str | os.PathLike[str],
    splits: Mapping[str, Sequence[QueryRecord]],
    videos: Mapping[str, np.ndarray],
    texts: Mapping[str, np.ndarray],
    sentences: Mapping[str, np.ndarray] | None,
    fps: float,
    *,
    video_feature_name: str = "synthetic",
    text_feature_name: str = "synthetic",
    paths: Mapping[str, str] | None = None,
    ext_timestamps: Mapping[str, tuple[float, float]] | None = None,
) -> None:
    """Write ``splits`` (split name -> records) and the features in ``layout`` under ``root``.

    ``videos`` is keyed by video id (T, Dv), ``texts`` and ``sentences`` by query id ((L, Dt) and (Dv,)).  ``paths``
    overrides default file names (keys as :data:`DEFAULT_PATHS`; e.g. ``{"annotations": "{split}.parquet"}`` for
    native Parquet, ``{"video_features": "video_features.h5"}`` for Ego4D video features in one HDF5 file).
    ``ext_timestamps`` (MAD only) gives ``ext_timestamps`` per query id; by default they equal ``timestamps``.
    MAD and Ego4D HDF5 video files carry an ``fps`` attribute so that a reader assuming another rate can say so.
    """
    check_layout(layout)
    _check_writer_inputs(splits, videos, texts, sentences, fps)
    names = {**DEFAULT_PATHS[layout], **(paths or {})}
    unknown = set(names) - set(DEFAULT_PATHS[layout])
    if unknown:
        raise ValueError(f"unknown path keys {sorted(unknown)}; use {sorted(DEFAULT_PATHS[layout])}")
    root = Path(root)

    def at(key: str, split: str = "") -> Path:
        return root / names[key].replace("{split}", split)

    if layout == "native":
        per_file: dict[Path, dict[str | None, Mapping[str, np.ndarray]]] = {}
        stores = (("video_features", videos), ("text_features", texts), ("sentence_features", sentences))
        for key, arrays in stores:
            if arrays is not None:
                per_file.setdefault(at(key), {})[NATIVE_GROUPS[key]] = arrays
        attrs = {"fps": float(fps), "video_feature_name": video_feature_name, "text_feature_name": text_feature_name}
        for file, groups in per_file.items():
            write_h5(file, groups, attrs)
        for split, records in splits.items():
            write_native_annotations(at("annotations", split), records)
        return

    video_path = at("video_features")
    if layout == "ego4d" and video_path.suffix != ".h5":
        for key in sorted(videos):
            write_pt(video_path / f"{key}.pt", videos[key])
    else:
        write_h5(video_path, {None: videos}, {"fps": float(fps)})
    write_h5(at("text_features"), {None: texts})
    if sentences is not None:
        write_h5(at("sentence_features"), {None: sentences})
    make_json: Callable[[Sequence[QueryRecord]], dict[str, Any]]
    if layout == "mad":
        ext = ext_timestamps or {}
        make_json = lambda recs: _mad_json(recs, ext)  # noqa: E731
    else:
        if ext_timestamps:
            raise ValueError("ext_timestamps exist only in the MAD layout")
        make_json = _ego4d_json
    for split, records in splits.items():
        atomic_write_json(at("annotations", split), make_json(records))
