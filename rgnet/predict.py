"""Ground one sentence in one long video: what ``rgnet predict`` runs (no Ray, no MLflow).

Inputs are features, not pixels: video features come from an external extractor at the rate the model was trained
on (MAD: CLIP ViT-B/32 frame features at 5 fps, 512-d; Ego4D-NLQ: EgoVLP clip features at 1.875 fps, 256-d), and
the query is either precomputed token features (L, Dt) from the training extractor or raw text for a model trained
with ``data.text_encoder=minilm`` (see :mod:`rgnet.text`).

Memory is bounded for any video length and any number of queries: the features are held once (T x Dv float32: a
3-hour movie at 5 fps with 512-d features is 110 MB) and projected once, the encoder runs in passes of
``eval.pass_frames`` frames (at most ``eval.window_chunk`` window-query pairs), and only the top-k windows' encodings
of a group of queries (at most ``eval.window_chunk`` pairs) are kept for the decoder
(:func:`rgnet.eval.inference.infer_video`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgnet.config import Config, DataConfig, EvalConfig
from rgnet.data.formats import DEFAULT_FPS
from rgnet.data.records import DataError, QueryRecord
from rgnet.data.samples import VideoItem, WindowSpec
from rgnet.data.windows import window_bounds
from rgnet.eval.inference import VideoScores, infer_video, window_rows
from rgnet.model.rgnet import RGNet

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth", ".npy")


@dataclass
class FeatureSource:
    """A feature array named on the command line as ``PATH`` or ``PATH:KEY``."""

    path: Path
    key: str | None

    @classmethod
    def parse(cls, spec: str) -> FeatureSource:
        """``PATH[:KEY]``; the key is what follows the last ':' when the part before it is an existing file."""
        if not spec:
            raise ValueError("empty feature path")
        if ":" in spec and not Path(spec).exists():
            head, key = spec.rsplit(":", 1)
            if Path(head).exists():
                return cls(Path(head), key or None)
        return cls(Path(spec), None)

    def __str__(self) -> str:
        return f"{self.path}:{self.key}" if self.key else str(self.path)


def _h5_datasets(f: Any) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def read_features(src: FeatureSource, *, kind: str, dim: int, rank: int = 2) -> tuple[np.ndarray, str, float | None]:
    """(array float32, key, fps attribute or None) of ``src``; errors name the file, the key and the field.

    HDF5: ``KEY`` is a dataset path (e.g. a MAD movie id, or ``videos/<id>`` in the native layout); without a key
    the file must hold exactly one dataset.  ``.pt``: a tensor, or a dict of tensors with ``KEY``.  ``.npy``: one
    array.  The array must be ``rank``-dimensional with last dimension ``dim`` and finite.
    """
    path = src.path
    if not path.is_file():
        raise DataError(path, f"{kind} feature file not found", fix="check the path (PATH or PATH:KEY)")
    suffix = path.suffix.lower()
    fps: float | None = None
    key = src.key
    if suffix in (".h5", ".hdf5"):
        import h5py

        from rgnet.data.features import nearest_key

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(path, f"cannot open as HDF5: {e}", fix="check that the file is complete") from e
        with f:
            names = _h5_datasets(f)
            if key is None:
                if len(names) != 1:
                    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                    raise DataError(
                        path,
                        f"the file holds {len(names)} datasets ({shown}): say which one",
                        field="key",
                        fix=f"give {path}:KEY",
                    )
                key = names[0]
            ds = f.get(key)
            if not isinstance(ds, h5py.Dataset):
                near = nearest_key(key, names)
                raise DataError(
                    path,
                    f"no {kind} features under key {key!r}"
                    + (f" (the nearest key is {near!r})" if near else " (the file holds no datasets)"),
                    record=key,
                    field="key",
                    fix="check the video id (MAD: the movie id; native layout: videos/<id>)",
                )
            raw_fps = ds.attrs.get("fps", f.attrs.get("fps"))
            fps = float(raw_fps) if raw_fps is not None else None
            arr = np.asarray(ds[()])
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if key is None or key not in obj:
                from rgnet.data.features import nearest_key

                near = nearest_key(key or "", [str(k) for k in obj])
                problem = "holds a dict of tensors: say which one" if key is None else f"has no key {key!r}"
                raise DataError(
                    path,
                    f"{problem}" + (f" (the nearest key is {near!r})" if near else ""),
                    record=key,
                    field="key",
                    fix=f"give {path}:KEY",
                )
            obj = obj[key]
        if not isinstance(obj, torch.Tensor):
            raise DataError(path, f"holds a {type(obj).__name__}, expected a tensor", record=key, field="key")
        arr = obj.detach().cpu().numpy()
        key = key or path.stem
    elif suffix == ".npy":
        if key is not None:
            raise DataError(path, "a .npy file holds one array: drop the ':KEY'", record=key, field="key")
        arr = np.load(path, allow_pickle=False)
        key = path.stem
    else:
        raise DataError(path, f"unknown feature file type {suffix!r}", fix=f"use one of {', '.join(FEATURE_SUFFIXES)}")
    return check_features(arr, source=path, key=key, kind=kind, dim=dim, rank=rank), key, fps


def check_features(arr: Any, *, source: object, key: str, kind: str, dim: int, rank: int = 2) -> np.ndarray:
    """``arr`` as a contiguous float32 array, checked: ``rank`` dimensions, last one ``dim``, at least one row, finite.
    Errors name ``source`` (a file, or where an in-memory array came from) and ``key``."""
    arr = np.asarray(arr)
    want = "(T, D)" if kind == "video" else "(L, D)"
    if arr.ndim != rank or arr.shape[-1] != dim or arr.shape[0] == 0:
        raise DataError(
            source,
            f"{kind} features {key!r} have shape {tuple(arr.shape)}, but this model expects {want} with D = {dim}"
            + (" and at least one row" if arr.ndim == rank and arr.shape[-1] == dim else ""),
            record=key,
            field="shape",
            fix=f"use the {kind} extractor the model was trained with (data.{kind}_dim={dim})",
        )
    if arr.dtype.kind not in "fiu":
        raise DataError(source, f"{kind} features {key!r} have dtype {arr.dtype}, expected float", record=key)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError(source, f"{kind} features {key!r} contain NaN or Inf", record=key, field="values")
    return out


def prepare_tokens(tokens: np.ndarray, max_tokens: int, normalize: bool) -> np.ndarray:
    """The dataset reader's treatment of query tokens: the first ``max_tokens``, each L2-normalised if asked."""
    tokens = np.asarray(tokens[:max_tokens], dtype=np.float32)
    if normalize:
        tokens = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), np.float32(1e-12))
    return tokens.astype(np.float32, copy=False)


def training_fps(data_cfg: DataConfig) -> float | None:
    """The feature rate the model was trained at, when the config says (data.fps or the layout's rate)."""
    if data_cfg.fps > 0:
        return float(data_cfg.fps)
    return DEFAULT_FPS.get(data_cfg.layout)


def resolve_fps(data_cfg: DataConfig, given: float | None, stored: float | None, source: object) -> float:
    """``--fps``, else the file's ``fps`` attribute, else the training rate; warns when they disagree."""
    trained = training_fps(data_cfg)
    fps = given or stored or trained
    if fps is None or fps <= 0:
        raise DataError(
            source,
            "the feature rate is unknown: the file has no 'fps' attribute and the model's config does not say",
            field="fps",
            fix="pass --fps (MAD CLIP features: 5; Ego4D EgoVLP features: 1.875)",
        )
    if trained is not None and not math.isclose(fps, trained, rel_tol=1e-6):
        log.warning(
            "%s: features at %g fps, but the model was trained on %g fps features (windows keep their seconds)",
            source,
            fps,
            trained,
        )
    return float(fps)


def needs_sentence(model: RGNet, eval_cfg: EvalConfig) -> bool:
    """Frozen-feature ranking (model.retrieval=none, the disjoint baseline) and eval.fusion=matching need a
    sentence feature in the video tower's space."""
    return model.context_head is None or eval_cfg.fusion == "matching"


@dataclass
class Grounding:
    """The answer for one query: moments best first, plus what the retrieval stage saw (for plots)."""

    video: str
    query: str
    duration_sec: float
    fps: float
    moments: list[list[float]]  # [start_sec, end_sec, score], best first, after NMS
    windows: list[list[float]]  # every window [start_sec, end_sec, sigmoid(s_ctx)], best first
    bounds: np.ndarray  # (P, 2) window frames [start, stop)
    scores: VideoScores  # context logits (1, P) and, when asked, sampling scores (1, P, Lv)

    def to_json(self) -> dict[str, Any]:
        return {
            "video": self.video,
            "query": self.query,
            "duration_sec": self.duration_sec,
            "fps": self.fps,
            "moments": [
                {"rank": i + 1, "start_sec": s, "end_sec": e, "score": p} for i, (s, e, p) in enumerate(self.moments)
            ],
            "top_windows": [{"start_sec": s, "end_sec": e, "score": p} for s, e, p in self.windows[:10]],
        }


@torch.no_grad()
def ground(
    model: RGNet,
    cfg: Config,
    frames: np.ndarray,
    fps: float,
    tokens: np.ndarray,
    *,
    video: str = "video",
    query: str = "",
    sentence: np.ndarray | None = None,
    top_n: int = 10,
    device: torch.device | None = None,
    keep_sampling_scores: bool = False,
) -> Grounding:
    """The top ``top_n`` moments of ``query`` (token features ``tokens``) in the video ``frames`` (T, Dv) at ``fps``.

    Moments are in seconds inside [0, T / fps], NMS-ed at ``eval.nms_iou`` and sorted by score
    (``p_fg * sigmoid(s_ctx)``, DESIGN section 5).  One query of :func:`ground_many`.
    """
    return ground_many(
        model,
        cfg,
        frames,
        fps,
        [tokens],
        video=video,
        queries=[query],
        sentences=None if sentence is None else [sentence],
        top_n=top_n,
        device=device,
        keep_sampling_scores=keep_sampling_scores,
    )[0]


@torch.no_grad()
def ground_many(
    model: RGNet,
    cfg: Config,
    frames: np.ndarray,
    fps: float,
    tokens: Sequence[np.ndarray],
    *,
    video: str = "video",
    queries: Sequence[str] | None = None,
    sentences: Sequence[np.ndarray] | None = None,
    top_n: int = 10,
    device: torch.device | None = None,
    keep_sampling_scores: bool = False,
) -> list[Grounding]:
    """:func:`ground` for many queries about one video: the answers, in the order of ``tokens`` (one (L_i, Dt) token
    feature array per query; ``queries`` their texts, for the answers only; ``sentences`` (Dv,) each, for
    frozen-feature ranking models).

    The video is read and projected once and the encoder batches (query, window) pairs of several queries in each
    pass, keeping a running top-k per query (:func:`rgnet.eval.inference.infer_video`); memory is bounded by
    ``eval.window_chunk`` whatever the number of queries.  Each answer equals what :func:`ground` gives for that
    query alone, up to floating-point summation order.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if not tokens:
        raise ValueError("no queries")
    for i, t in enumerate(tokens):
        if len(t) == 0:
            raise ValueError(f"query {i + 1} has no tokens")
    names = list(queries) if queries is not None else [""] * len(tokens)
    if len(names) != len(tokens) or (sentences is not None and len(sentences) != len(tokens)):
        raise ValueError("tokens, queries and sentences must have one entry per query")
    device = device or torch.device("cpu")
    duration = frames.shape[0] / fps
    spec = WindowSpec.from_config(cfg.windows, fps)
    records = [
        QueryRecord(
            query_id=f"query{i}",
            video_id=video,
            query=name or "(features)",
            start_sec=0.0,
            end_sec=0.0,
            duration_sec=duration,
            video_key=video,
            query_key=f"query{i}",
        )
        for i, name in enumerate(names)
    ]
    item = VideoItem(
        video_key=video,
        duration_sec=duration,
        frames=torch.from_numpy(frames),
        bounds=window_bounds(frames.shape[0], spec.length, spec.stride),
        spec=spec,
        records=records,
        texts=[prepare_tokens(t, cfg.data.max_query_tokens, cfg.data.normalize_text) for t in tokens],
        sentences=list(sentences) if sentences is not None else None,
    )
    eval_cfg = replace(cfg.eval, max_predictions=top_n)
    rows, scores = infer_video(model, item, eval_cfg, device, keep_sampling_scores=keep_sampling_scores)
    answers = []
    for i, (name, row) in enumerate(zip(names, window_rows(item, scores, rows))):
        windows = row.windows or []  # ranked by window_rows
        own = VideoScores(
            scores.context_logit[i : i + 1], None if scores.sampling_score is None else scores.sampling_score[i : i + 1]
        )
        answers.append(Grounding(video, name, duration, fps, row.predictions, windows, item.bounds, own))
    return answers


# ---------------------------------------------------------------------------------------------------------------
# One query from files or arrays: what ``rgnet predict --video`` and the logged MLflow model run
# ---------------------------------------------------------------------------------------------------------------
FeatureInput = str | Path | np.ndarray  # "PATH[:KEY]" of a feature file, or the array itself


def feature_input(value: FeatureInput, *, kind: str, dim: int, rank: int = 2) -> tuple[np.ndarray, str, float | None]:
    """(float32 array, key, fps attribute or None) of a feature file spec (:func:`read_features`) or of an in-memory
    array (:func:`check_features`; a 1-d sentence feature becomes one row)."""
    if isinstance(value, str | Path):
        return read_features(FeatureSource.parse(str(value)), kind=kind, dim=dim, rank=rank)
    arr = np.asarray(value)
    if kind == "sentence" and arr.ndim == 1:
        arr = arr[None]  # (Dv,) -> (1, Dv)
    return check_features(arr, source=f"the {kind} array", key=kind, kind=kind, dim=dim, rank=rank), kind, None


def query_inputs(
    model: RGNet,
    cfg: Config,
    *,
    video: FeatureInput,
    query: str | None = None,
    query_features: FeatureInput | None = None,
    sentence_features: FeatureInput | None = None,
    fps: float | None = None,
) -> dict[str, Any]:
    """The arguments of :func:`ground` for one query: features read (file specs) or checked (arrays), the rate
    resolved (:func:`resolve_fps`), the query's tokens read or encoded (:func:`text_tokens`)."""
    frames, key, stored_fps = feature_input(video, kind="video", dim=cfg.data.video_dim)
    rate = resolve_fps(cfg.data, fps, stored_fps, video if isinstance(video, str) else "the video array")
    if query_features is not None:
        tokens, qkey, _ = feature_input(query_features, kind="text", dim=cfg.data.text_dim)
        query = query or qkey
    else:
        tokens = text_tokens(cfg.data, query or "")
    sentence = None
    if sentence_features is not None:
        sentence = feature_input(sentence_features, kind="sentence", dim=cfg.data.video_dim)[0][0]
    elif needs_sentence(model, cfg.eval):
        raise ValueError(
            "this model ranks windows by frozen-feature similarity (model.retrieval=none or eval.fusion=matching) "
            "and needs the query's sentence feature: pass --sentence-features F[:KEY] (the MLflow model: "
            "'sentence_features')"
        )
    return {
        "frames": frames,
        "fps": rate,
        "tokens": tokens,
        "video": key.rsplit("/", 1)[-1],
        "query": query or "",
        "sentence": sentence,
    }


def ground_query(
    model: RGNet,
    cfg: Config,
    *,
    top: int = 10,
    device: torch.device | None = None,
    keep_sampling_scores: bool = False,
    **inputs: Any,
) -> Grounding:
    """The top ``top`` moments of one query in one video, ``inputs`` being those of :func:`query_inputs` (files or
    arrays): what ``rgnet predict --video`` and the logged MLflow model (``pipelines.mlflow_model``) both run."""
    return ground(
        model,
        cfg,
        **query_inputs(model, cfg, **inputs),
        top_n=top,
        device=device,
        keep_sampling_scores=keep_sampling_scores,
    )


def format_answer(answer: Grounding) -> str:
    """The answer as a text table: the video and query, then one line per moment (rank, start, end, score)."""
    lines = [
        f"video {answer.video}: {answer.duration_sec:.1f} s at {answer.fps:g} fps; query: {answer.query!r}",
        f"{'rank':>4}  {'start (s)':>10}  {'end (s)':>10}  {'score':>8}",
    ]
    for i, (s, e, p) in enumerate(answer.moments):
        lines.append(f"{i + 1:>4}  {s:>10.2f}  {e:>10.2f}  {p:>8.4f}")
    return "\n".join(lines)


def timeline_plot(answer: Grounding, out_dir: str | Path, top_k_windows: int, name: str = "") -> Path:
    """The answer's timeline plot (:func:`rgnet.eval.plots.draw_timeline`) in ``out_dir``, named after ``name``
    (default: the video): window context scores, and the frame sampling scores when the answer kept them
    (``keep_sampling_scores``)."""
    from rgnet.eval.plots import draw_timeline, frame_score_curve

    frame_scores = None
    if answer.scores.sampling_score is not None:
        num_frames = int(answer.bounds[-1, 1])
        frame_scores = frame_score_curve(answer.bounds, answer.scores.sampling_score[0].numpy(), num_frames)
    return draw_timeline(
        out_dir,
        name or answer.video,
        fps=answer.fps,
        bounds=answer.bounds,
        frame_scores=frame_scores,
        top_k_windows=top_k_windows,
        duration_sec=answer.duration_sec,
        context_logit=answer.scores.context_logit[0].numpy(),
        gt=None,
        predictions=answer.moments,
        query=answer.query,
    )


def text_tokens(data_cfg: DataConfig, query: str) -> np.ndarray:
    """Token features of raw text with the model's text encoder (``data.text_encoder``)."""
    return text_tokens_many(data_cfg, [query])[0]


def text_tokens_many(data_cfg: DataConfig, queries: Sequence[str]) -> list[np.ndarray]:
    """Token features (L_i, Dt) of each sentence with the model's text encoder (``data.text_encoder``), in batches."""
    from rgnet.text import get_text_encoder

    for q in queries:
        if not q.strip():
            raise ValueError("the query is empty: give a sentence with --query")
    if not data_cfg.text_encoder:
        raise ValueError(
            f"this model reads precomputed {data_cfg.text_dim}-d query token features (it was trained without "
            "data.text_encoder): pass --query-features FILE[:KEY] from the same text extractor (MAD: CLIP token "
            "features), or train with data.text_encoder=minilm data.text_dim=384 to query with raw text"
        )
    return get_text_encoder(data_cfg.text_encoder).encode(list(queries))


@dataclass
class QueryLine:
    """One query of a ``--queries`` file (JSON Lines), read and checked."""

    id: str | int  # the line's "id" (default: its line number)
    query: str  # the sentence (the "query_features" spec when only features were given)
    tokens: np.ndarray  # (L, Dt) token features, from "query_features" or encoded from "query"
    sentence: np.ndarray | None  # (Dv,) from "sentence_features" (frozen-feature ranking models)


QUERY_LINE_FORMAT = '{"id": ..., "query": "a sentence"} or {"id": ..., "query_features": "FEATURES.h5:KEY"}'


def read_queries(path: str | Path, data_cfg: DataConfig, *, sentence_needed: bool = False) -> list[QueryLine]:
    """The queries of a JSON Lines file, one object per line: ``{"id": ..., "query": "a sentence"}`` (models with a
    text encoder) or ``{"id": ..., "query_features": "FEATURES.h5:KEY"}`` (both: the sentence labels the features),
    plus ``"sentence_features"`` for frozen-feature ranking models.  Relative feature paths are relative to the
    file's folder.  Blank lines are skipped; a missing id is the line number.  Any bad line is a :class:`DataError`
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "queries file not found", fix=f"one JSON object per line: {QUERY_LINE_FORMAT}")
    lines: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str | int, int] = {}
    with path.open(encoding="utf-8") as fh:
        for n, text in enumerate(fh, 1):
            if not text.strip():
                continue
            where = f"{path}, line {n}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(where, f"not JSON ({e.msg} at column {e.colno})", fix=QUERY_LINE_FORMAT) from e
            if not isinstance(obj, dict):
                raise DataError(where, f"a JSON {type(obj).__name__}, not an object", fix=QUERY_LINE_FORMAT)
            qid = obj.get("id", n)
            if isinstance(qid, bool) or not isinstance(qid, str | int):
                raise DataError(where, f"the id {qid!r} is not a string or an integer", field="id")
            if qid in seen:
                raise DataError(where, f"the id {qid!r} is already used on line {seen[qid]}", field="id")
            seen[qid] = n
            if obj.get("query") is None and obj.get("query_features") is None:
                raise DataError(where, "has neither 'query' nor 'query_features'", fix=QUERY_LINE_FORMAT)
            for name in ("query", "query_features", "sentence_features"):
                if obj.get(name) is not None and not isinstance(obj[name], str):
                    raise DataError(where, f"{name} must be a string, got {obj[name]!r}", field=name)
            if obj.get("query_features") is None and not str(obj["query"]).strip():
                raise DataError(where, "the query is empty", field="query")
            if sentence_needed and obj.get("sentence_features") is None:
                raise DataError(
                    where,
                    "this model ranks windows by frozen-feature similarity and needs each query's sentence feature",
                    field="sentence_features",
                    fix='add "sentence_features": "FEATURES.h5:KEY"',
                )
            lines.append((n, {**obj, "id": qid}))
    if not lines:
        raise DataError(path, "holds no queries", fix=f"one JSON object per line: {QUERY_LINE_FORMAT}")

    def features(n: int, spec: str, field: str, kind: str, dim: int) -> np.ndarray:
        src = FeatureSource.parse(spec if Path(spec).is_absolute() else str(path.parent / spec))
        try:
            return read_features(src, kind=kind, dim=dim)[0]
        except DataError as e:
            raise DataError(f"{path}, line {n}", str(e), field=field) from e

    to_encode = [(n, obj) for n, obj in lines if obj.get("query_features") is None]
    encoded: dict[int, np.ndarray] = {}
    if to_encode:
        try:
            encoded = dict(
                zip((n for n, _ in to_encode), text_tokens_many(data_cfg, [o["query"] for _, o in to_encode]))
            )
        except ValueError as e:
            raise DataError(f"{path}, line {to_encode[0][0]}", str(e), field="query") from e
    out = []
    for n, obj in lines:
        if obj.get("query_features") is not None:
            tokens = features(n, obj["query_features"], "query_features", "text", data_cfg.text_dim)
        else:
            tokens = encoded[n]
        sentence = None
        if obj.get("sentence_features") is not None:
            sentence = features(n, obj["sentence_features"], "sentence_features", "sentence", data_cfg.video_dim)[0]
        out.append(QueryLine(obj["id"], str(obj.get("query") or obj["query_features"]), tokens, sentence))
    return out
