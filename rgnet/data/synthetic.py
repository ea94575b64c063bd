"""The seeded planted-moment generator: long videos with queries whose moments we put there ourselves.

Why it exists: every layer of the platform (readers, windows, model, losses, metrics, Ray jobs) can be exercised and
*learn something* without downloading MAD or Ego4D, and the answer is known exactly.

Generative story (all draws from ``np.random.default_rng`` seeded by ``cfg.seed``; every length below in the
"latent unit", in which a concept vector has norm 1 and a per-direction standard deviation is quoted):

1. **World.** ``num_concepts`` unit concept vectors ``c_k`` in ``R^latent_dim``, each with a made-up word
   ("balo", "kemi", ...), and a vocabulary of filler words (function words) with their own unit latents.
   Two towers, like CLIP's: the video tower maps latent content to ``R^video_dim`` through ``A_v`` (orthonormal
   columns) and maps a second, *nuisance* state (scene style: lighting, layout, camera, what no query talks
   about) through ``B_v`` (orthonormal columns, orthogonal to ``A_v``); the text tower maps token latents to
   ``R^text_dim`` through ``A_t`` (orthonormal columns).
2. **Videos.** Length uniform in ``[video_min_sec, video_max_sec]``; ``T = round(length * fps)`` frames and
   ``duration_sec = T / fps`` exactly.  The video is a sequence of scenes (gamma-distributed lengths, mean
   ``scene_mean_sec``).  Each scene starts at a random content point (per-direction std ``scene_scale``) and a
   random nuisance point (per-direction std ``nuisance_scale``) and both drift as random walks inside the scene;
   cuts are abrupt, as shot changes are.
3. **Queries.** ``queries_per_video`` per video, each about a *pair* of concepts: a main concept ``m`` and an
   attribute concept ``a`` (no pair repeats within a video, so the answer is unique).  The query direction is
   ``z = normalise(c_m + c_a)``.  Its moment (length from a log-normal around ``moment_mean_sec``, clipped to
   ``[moment_min_sec, moment_max_sec]``, on the frame grid, start uniform in the video) gets
   ``plant_strength * z`` added to its content, with a half-strength frame before and after (a soft onset).
4. **Distractors.** ``distractors_per_query`` spans of the same video that stay clear of the moment (and of its
   onset frames) get a unit latent whose projection on ``z`` is ``distractor_overlap`` (see
   :func:`_distractor_latent`): at the default 0.5 that is exactly "one of the query's two concepts plus a foreign
   concept", e.g. the attribute without the main concept.  A matcher must therefore read the whole query.
5. **Frames.** ``f_t = A_v x_t + B_v y_t + noise`` with x the content, y the nuisance, and isotropic noise of
   per-coordinate std ``frame_noise / sqrt(latent_dim)`` (so the noise inside any latent-sized subspace has norm
   ``frame_noise``: frames stay temporally smooth, as real CLIP/EgoVLP features are).
6. **Token features** (what RGNet reads): the query's words are fillers with the bigram "<attribute> <main>" at a
   random position, ``L`` uniform in ``[query_min_tokens, query_max_tokens]``; token ``i`` is
   ``A_t w_i + noise`` (per-coordinate std ``text_noise / sqrt(latent_dim)``).  The model must learn the map from
   the text tower to the video tower: nothing in the data states it.
7. **Sentence features** (the frozen "CLS/EOT" feature in the video tower's space, used only by the frozen-feature
   baseline): ``normalise(alignment * A_v z + (1 - alignment) * A_s z + noise)`` with ``A_s = B_v R`` for a fixed
   random rotation ``R``: the unaligned part of the text tower points at visual *style* that has nothing to do with
   the query.  Since the nuisance changes scene by scene, the frozen cosine ranks windows partly by style: weakly
   informative, far from solving the task (measured by :func:`frozen_retrieval_recall`).

Layouts and ids: video ids ``syn-v0007`` (global index, splits have disjoint videos); each video has one Ego4D-style
annotation uid ``syn-a0007`` and its queries are ``syn-a0007_<j>`` (``<annotation_uid>_<index>``), which every layout
accepts.  Files are written by :func:`rgnet.data.formats.write_dataset`; a marker ``SYNTHETIC.json`` (config and
file hashes) is written last and lets :func:`ensure_dataset` reuse a folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rgnet.config import ConfigError, DataConfig, SyntheticConfig
from rgnet.data.records import DataError, QueryRecord
from rgnet.io import atomic_write_json

MARKER = "SYNTHETIC.json"
GENERATOR_VERSION = 1  # bump when the generative story changes: a marker with another version is regenerated
SPLITS = ("train", "val", "test")

MOMENT_LOG_SIGMA = 0.5  # spread of the log-normal moment length (log-seconds)
SCENE_GAMMA_SHAPE = 2.0  # scene lengths ~ Gamma(2): fewer one-frame scenes than an exponential
WALK_PER_SCENE = 0.5  # a random walk moves about this fraction of the scene scale over a mean-length scene
ONSET = 0.5  # plant weight of the one frame before and after a moment or distractor (soft onset/offset)

_FILLERS = (
    "the", "a", "where", "did", "i", "what", "when", "is", "was", "in", "on", "of",
    "to", "my", "see", "put", "after", "before", "with", "at", "that", "this", "how", "last",
)  # fmt: skip
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class SyntheticData:
    """A generated dataset in memory, plus the ground truth of how it was made (for tests and diagnostics)."""

    splits: dict[str, list[QueryRecord]]  # "train", "val", "test"
    videos: dict[str, np.ndarray]  # video_key -> (T, Dv) float32
    texts: dict[str, np.ndarray]  # query_key -> (L, Dt) float32 token features
    sentences: dict[str, np.ndarray]  # query_key -> (Dv,) float32 unit sentence feature in the video tower's space
    fps: float
    concept_of_query: dict[str, int]  # query_id -> main concept index
    distractor_spans_sec: dict[str, list[tuple[float, float]]]  # query_id -> distractor spans (start, end) seconds
    attribute_of_query: dict[str, int] = field(default_factory=dict)  # query_id -> attribute concept index
    planted_direction: dict[str, np.ndarray] = field(default_factory=dict)  # query_id -> (Dv,) unit A_v z


# ---------------------------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------------------------
def check_config(cfg: SyntheticConfig) -> None:
    """Reject knob values the generator cannot honour; the message names the key and how to fix it."""
    p = "data.synthetic."
    positive = ("fps", "moment_mean_sec", "moment_min_sec", "video_min_sec", "scene_mean_sec")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{p}{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("num_train_videos", "num_val_videos", "num_test_videos", "distractors_per_query"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{p}{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.queries_per_video < 1:
        raise ConfigError(f"{p}queries_per_video must be >= 1, got {cfg.queries_per_video}")
    if cfg.video_max_sec < cfg.video_min_sec:
        raise ConfigError(f"{p}video_max_sec={cfg.video_max_sec} must be >= video_min_sec={cfg.video_min_sec}")
    if not cfg.moment_min_sec <= cfg.moment_mean_sec <= cfg.moment_max_sec:
        raise ConfigError(
            f"{p}moment_min_sec <= moment_mean_sec <= moment_max_sec must hold, got "
            f"{cfg.moment_min_sec}, {cfg.moment_mean_sec}, {cfg.moment_max_sec}"
        )
    if cfg.moment_max_sec > cfg.video_min_sec:
        raise ConfigError(
            f"{p}moment_max_sec={cfg.moment_max_sec} exceeds video_min_sec={cfg.video_min_sec}: a moment must fit "
            "in the shortest video (raise video_min_sec or lower moment_max_sec)"
        )
    if cfg.moment_min_sec * cfg.fps < 1:
        raise ConfigError(f"{p}moment_min_sec * fps must be >= 1 frame, got {cfg.moment_min_sec * cfg.fps:.3g}")
    if cfg.latent_dim < 2:
        raise ConfigError(f"{p}latent_dim must be >= 2, got {cfg.latent_dim}")
    if cfg.video_dim < 2 * cfg.latent_dim:
        raise ConfigError(
            f"{p}video_dim={cfg.video_dim} must be >= 2 * latent_dim={2 * cfg.latent_dim} (the video tower holds "
            "the content and the nuisance subspaces side by side): raise video_dim or lower latent_dim"
        )
    if cfg.text_dim < cfg.latent_dim:
        raise ConfigError(f"{p}text_dim={cfg.text_dim} must be >= latent_dim={cfg.latent_dim}")
    if not 3 <= cfg.num_concepts <= len(_CONSONANTS) ** 2 * len(_VOWELS) ** 2:
        raise ConfigError(f"{p}num_concepts must be in [3, 4900], got {cfg.num_concepts}")
    pairs = cfg.num_concepts * (cfg.num_concepts - 1) // 2
    if cfg.queries_per_video > pairs:
        raise ConfigError(
            f"{p}queries_per_video={cfg.queries_per_video} exceeds the {pairs} distinct concept pairs of "
            f"num_concepts={cfg.num_concepts}: raise num_concepts"
        )
    if not 2 <= cfg.query_min_tokens <= cfg.query_max_tokens:
        raise ConfigError(
            f"{p}query_min_tokens={cfg.query_min_tokens}, query_max_tokens={cfg.query_max_tokens}: need "
            "2 <= min <= max (a query holds at least its attribute and main word)"
        )
    for name in ("alignment", "distractor_overlap"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{p}{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("frame_noise", "text_noise", "plant_strength", "scene_scale", "nuisance_scale"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{p}{name} must be >= 0, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------------------------------------------------
# The world: concepts, words, towers
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _World:
    concepts: np.ndarray  # (K, latent) unit rows
    concept_words: list[str]
    filler_latents: np.ndarray  # (F, latent) unit rows
    a_v: np.ndarray  # (Dv, latent) content columns of the video tower
    b_v: np.ndarray  # (Dv, latent) nuisance columns, orthogonal to a_v
    a_s: np.ndarray  # (Dv, latent) the unaligned part of the sentence tower: b_v @ R
    a_t: np.ndarray  # (Dt, latent) text tower


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) with orthonormal columns, sign-fixed so the QR factorisation is unique."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))[None, :]


def _word(k: int) -> str:
    """A pronounceable made-up word per concept index (two consonant-vowel syllables; unique below 4900)."""
    syllables = []
    for _ in range(2):
        k, r = divmod(k, len(_CONSONANTS) * len(_VOWELS))
        syllables.append(_CONSONANTS[r // len(_VOWELS)] + _VOWELS[r % len(_VOWELS)])
    return "".join(syllables)


def _make_world(cfg: SyntheticConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    d = cfg.latent_dim
    concepts = _unit_rows(rng.standard_normal((cfg.num_concepts, d)))
    fillers = _unit_rows(rng.standard_normal((len(_FILLERS), d)))
    video_basis = _orthonormal(rng, cfg.video_dim, 2 * d)
    a_v, b_v = video_basis[:, :d], video_basis[:, d:]
    rotation = _orthonormal(rng, d, d)  # R: maps a concept onto unrelated style directions
    a_t = _orthonormal(rng, cfg.text_dim, d)
    return _World(concepts, [_word(k) for k in range(cfg.num_concepts)], fillers, a_v, b_v, b_v @ rotation, a_t)


def _distractor_latent(shared: np.ndarray, other: np.ndarray, foreign: np.ndarray, overlap: float) -> np.ndarray:
    """A unit latent whose projection on the query direction normalise(shared + other) is ``overlap``.

    Concepts are (nearly) orthogonal unit vectors, so ``a * shared + b * other + f * foreign`` with ``a^2 + b^2 +
    f^2 = 1`` projects ``(a + b) / sqrt(2)``.  Up to overlap = 1/sqrt(2) the distractor keeps one of the query's
    concepts and fills up with a foreign one (at 0.5: half shared, half foreign, the "attribute without the main
    concept" case); above it the foreign concept is replaced by the rest of the query until, at 1, the distractor
    equals the query.
    """
    target = math.sqrt(2.0) * overlap  # a + b
    if overlap <= 1 / math.sqrt(2.0):
        a, b, f = target, 0.0, math.sqrt(max(1.0 - target * target, 0.0))
    else:
        root = math.sqrt(max(2.0 - target * target, 0.0))
        a, b, f = (target + root) / 2, (target - root) / 2, 0.0
    return a * shared + b * other + f * foreign


# ---------------------------------------------------------------------------------------------------------------
# One video and its queries
# ---------------------------------------------------------------------------------------------------------------
def _video_id(index: int) -> str:
    return f"syn-v{index:04d}"


def _annotation_uid(index: int) -> str:
    return f"syn-a{index:04d}"


def _scene_walk(
    rng: np.random.Generator, bounds: Sequence[tuple[int, int]], dim: int, scale: float, mean_len: float
) -> np.ndarray:
    """(T, dim): per scene a random start point (per-direction std ``scale``) plus a random walk from it."""
    total = bounds[-1][1]
    out = np.empty((total, dim))
    step = scale * WALK_PER_SCENE / math.sqrt(max(mean_len, 1.0))
    for start, stop in bounds:
        origin = scale * rng.standard_normal(dim)
        walk = np.cumsum(step * rng.standard_normal((stop - start, dim)), axis=0)
        out[start:stop] = origin + walk
    return out


def _scene_bounds(rng: np.random.Generator, num_frames: int, mean_frames: float) -> list[tuple[int, int]]:
    bounds = []
    start = 0
    while start < num_frames:
        length = max(1, round(rng.gamma(SCENE_GAMMA_SHAPE, mean_frames / SCENE_GAMMA_SHAPE)))
        stop = min(start + length, num_frames)
        bounds.append((start, stop))
        start = stop
    return bounds


def _span_frames(rng: np.random.Generator, cfg: SyntheticConfig) -> int:
    """Length in frames of one moment: log-normal with mean ``moment_mean_sec``, clipped to [min, max] seconds."""
    mu = math.log(cfg.moment_mean_sec) - MOMENT_LOG_SIGMA**2 / 2  # so that E[length] = moment_mean_sec before clipping
    sec = float(np.clip(rng.lognormal(mu, MOMENT_LOG_SIGMA), cfg.moment_min_sec, cfg.moment_max_sec))
    return max(1, round(sec * cfg.fps))


def _envelope(num_frames: int, start: int, stop: int) -> np.ndarray:
    """(T,) plant weights: 1 on [start, stop), ONSET on the frame before and the frame after."""
    env = np.zeros(num_frames)
    env[start:stop] = 1.0
    if start > 0:
        env[start - 1] = ONSET
    if stop < num_frames:
        env[stop] = ONSET
    return env


def _free_starts(num_frames: int, length: int, gt_start: int, gt_stop: int) -> np.ndarray:
    """Start frames of a span of ``length`` that, onset frames included, stays clear of the GT and its onsets."""
    starts = np.arange(0, num_frames - length + 1)
    clear = (starts + length + 2 <= gt_start) | (starts >= gt_stop + 2)
    return starts[clear]


@dataclass
class _Video:
    video_id: str
    features: np.ndarray  # (T, Dv) float32
    records: list[QueryRecord]
    texts: dict[str, np.ndarray]
    sentences: dict[str, np.ndarray]
    concepts: dict[str, tuple[int, int]]  # query_id -> (main, attribute)
    distractors_sec: dict[str, list[tuple[float, float]]]
    directions: dict[str, np.ndarray]


def _make_video(cfg: SyntheticConfig, world: _World, index: int) -> _Video:
    rng = np.random.default_rng([cfg.seed, 1, index])
    d = cfg.latent_dim
    fps = cfg.fps
    num_frames = max(1, round(rng.uniform(cfg.video_min_sec, cfg.video_max_sec) * fps))
    duration_sec = num_frames / fps
    mean_scene = cfg.scene_mean_sec * fps
    bounds = _scene_bounds(rng, num_frames, mean_scene)
    content = _scene_walk(rng, bounds, d, cfg.scene_scale, mean_scene)  # (T, latent)
    nuisance = _scene_walk(rng, bounds, d, cfg.nuisance_scale, mean_scene)  # (T, latent)

    # Distinct unordered concept pairs per video (no other query's moment can answer this one), randomly oriented.
    k = cfg.num_concepts
    first, second = np.triu_indices(k, 1)
    chosen = rng.choice(len(first), size=cfg.queries_per_video, replace=False)
    flip = rng.integers(0, 2, size=cfg.queries_per_video).astype(bool)
    pairs = [(int(second[c]), int(first[c])) if f else (int(first[c]), int(second[c])) for c, f in zip(chosen, flip)]
    taken = {frozenset(p) for p in pairs}

    vid = _video_id(index)
    uid = _annotation_uid(index)
    out = _Video(vid, np.empty(0, np.float32), [], {}, {}, {}, {}, {})
    for j, (main, attr) in enumerate(pairs):
        qid = f"{uid}_{j}"
        z = _unit_rows(world.concepts[main] + world.concepts[attr])
        length = min(_span_frames(rng, cfg), num_frames)
        start = int(rng.integers(0, num_frames - length + 1))
        content += cfg.plant_strength * _envelope(num_frames, start, start + length)[:, None] * z[None, :]

        spans: list[tuple[float, float]] = []
        for _ in range(cfg.distractors_per_query):
            d_len = min(_span_frames(rng, cfg), num_frames)
            free = _free_starts(num_frames, d_len, start, start + length)
            keep_attr = bool(rng.integers(2))  # share the attribute or the main concept, half the time each
            shared, other = (attr, main) if keep_attr else (main, attr)
            candidates = [c for c in range(k) if c not in (main, attr) and frozenset((shared, c)) not in taken]
            foreign = int(rng.choice(candidates)) if candidates else other
            if len(free) == 0:
                continue  # no room left in a short video: fewer distractors for this query
            d_start = int(rng.choice(free))
            latent = _distractor_latent(
                world.concepts[shared], world.concepts[other], world.concepts[foreign], cfg.distractor_overlap
            )
            content += cfg.plant_strength * _envelope(num_frames, d_start, d_start + d_len)[:, None] * latent[None, :]
            spans.append((d_start / fps, (d_start + d_len) / fps))

        words, token_latents = _query_tokens(rng, cfg, world, main, attr)
        token_noise = rng.standard_normal((len(words), cfg.text_dim)) * (cfg.text_noise / math.sqrt(d))
        sentence = cfg.alignment * (world.a_v @ z) + (1 - cfg.alignment) * (world.a_s @ z)
        sentence = sentence + rng.standard_normal(cfg.video_dim) * (cfg.text_noise / math.sqrt(d))

        out.records.append(
            QueryRecord(
                query_id=qid,
                video_id=vid,
                query=" ".join(words),
                start_sec=start / fps,
                end_sec=(start + length) / fps,
                duration_sec=duration_sec,
                video_key=vid,
                query_key=qid,
            )
        )
        out.texts[qid] = (token_latents @ world.a_t.T + token_noise).astype(np.float32)  # (L, Dt)
        out.sentences[qid] = _unit_rows(sentence).astype(np.float32)  # (Dv,)
        out.concepts[qid] = (main, attr)
        out.distractors_sec[qid] = spans
        out.directions[qid] = (world.a_v @ z).astype(np.float32)

    frame_noise = rng.standard_normal((num_frames, cfg.video_dim)) * (cfg.frame_noise / math.sqrt(d))
    out.features = (content @ world.a_v.T + nuisance @ world.b_v.T + frame_noise).astype(np.float32)  # (T, Dv)
    return out


def _query_tokens(
    rng: np.random.Generator, cfg: SyntheticConfig, world: _World, main: int, attr: int
) -> tuple[list[str], np.ndarray]:
    """Words of one query and their latents (L, latent): fillers around the bigram "<attribute> <main>"."""
    length = int(rng.integers(cfg.query_min_tokens, cfg.query_max_tokens + 1))
    at = int(rng.integers(0, length - 1))
    filler_ids = rng.integers(0, len(_FILLERS), size=length)
    words = [_FILLERS[i] for i in filler_ids]
    latents = world.filler_latents[filler_ids].copy()
    words[at], words[at + 1] = world.concept_words[attr], world.concept_words[main]
    latents[at], latents[at + 1] = world.concepts[attr], world.concepts[main]
    return words, latents


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def split_sizes(cfg: SyntheticConfig) -> dict[str, int]:
    return {"train": cfg.num_train_videos, "val": cfg.num_val_videos, "test": cfg.num_test_videos}


def make_synthetic(cfg: SyntheticConfig, *, progress: bool = False) -> SyntheticData:
    """Generate the whole dataset in memory. Pure: the same config gives the same arrays, bit for bit.

    Each video draws from its own stream (seed, video index), so the train videos do not change when only the
    val/test counts do.  ``progress`` shows a tqdm bar over videos (long presets take a while).
    """
    check_config(cfg)
    world = _make_world(cfg)
    data = SyntheticData(splits={}, videos={}, texts={}, sentences={}, fps=cfg.fps, concept_of_query={},
                         distractor_spans_sec={})  # fmt: skip
    total = sum(split_sizes(cfg).values())
    indices: Iterable[int] = range(total)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="synthetic videos", unit="video")
    split_of = [name for name, n in split_sizes(cfg).items() for _ in range(n)]
    for name in SPLITS:
        data.splits[name] = []
    for index in indices:
        video = _make_video(cfg, world, index)
        data.splits[split_of[index]].extend(video.records)
        data.videos[video.video_id] = video.features
        data.texts.update(video.texts)
        data.sentences.update(video.sentences)
        data.distractor_spans_sec.update(video.distractors_sec)
        data.planted_direction.update(video.directions)
        for qid, (main, attr) in video.concepts.items():
            data.concept_of_query[qid] = main
            data.attribute_of_query[qid] = attr
    return data


def _file_hashes(root: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(root).as_posix()] = digest.hexdigest()
    return hashes


def _marker(cfg: SyntheticConfig, layout: str, paths: dict[str, str], files: dict[str, str]) -> dict[str, Any]:
    content = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    return {
        "generator": "rgnet.data.synthetic",
        "version": GENERATOR_VERSION,
        "layout": layout,
        "paths": paths,
        "config": dataclasses.asdict(cfg),
        "content_sha256": content,
        "files": files,
    }


def read_marker(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The generator's marker in ``root``, or None where there is none (or it is unreadable)."""
    path = Path(root) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_ours_or_empty(root: Path) -> bool:
    return not root.exists() or (root.is_dir() and not any(root.iterdir())) or read_marker(root) is not None


@contextlib.contextmanager
def _staging_dir(root: Path) -> Iterator[Path]:
    """A fresh hidden sibling of ``root``, removed unless the caller moved it into place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_synthetic(
    cfg: SyntheticConfig,
    out_dir: str | os.PathLike[str],
    layout: str | None = None,
    *,
    progress: bool = False,
    data: SyntheticData | None = None,
    paths: Mapping[str, str] | None = None,
) -> Path:
    """Generate and write the dataset in ``layout`` (default ``cfg.layout``) to ``out_dir``; returns the folder.

    The folder appears complete or not at all: files are written into a hidden sibling, the marker last, and the
    sibling is renamed into place.  An existing folder is replaced only if this generator wrote it (it holds the
    marker) or it is empty; a folder with other files is refused, so no user data is ever deleted.  ``data`` may
    pass ``make_synthetic(cfg)`` when the caller already has it (the prepare job reuses it for its diagnostic);
    ``paths`` overrides the layout's file names (keys as ``rgnet.data.formats.DEFAULT_PATHS``).
    """
    from rgnet.data.formats import write_dataset

    root = Path(out_dir)
    layout = layout or cfg.layout
    if not _is_ours_or_empty(root):
        raise DataError(
            root,
            f"folder exists and holds files without a {MARKER} marker, so it was not written by the generator",
            fix="choose an empty or new folder (--out / data.root), or delete this one if it is disposable",
        )
    if data is None:
        data = make_synthetic(cfg, progress=progress)
    with _staging_dir(root) as tmp:
        write_dataset(layout, tmp, data.splits, data.videos, data.texts, data.sentences, data.fps,
                      video_feature_name="synthetic", text_feature_name="synthetic", paths=paths)  # fmt: skip
        atomic_write_json(tmp / MARKER, _marker(cfg, layout, dict(paths or {}), _file_hashes(tmp)))
        _move_into_place(tmp, root)
    return root


def _move_into_place(tmp: Path, root: Path) -> None:
    """Rename ``tmp`` to ``root``; an old generated ``root`` is swapped out first and deleted after."""
    old: Path | None = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}-{tmp.name[-12:]}")
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _marker_matches(root: Path, cfg: SyntheticConfig, layout: str, paths: dict[str, str]) -> bool:
    marker = read_marker(root)
    return (
        marker is not None
        and marker.get("version") == GENERATOR_VERSION
        and marker.get("layout") == layout
        and marker.get("paths", {}) == paths
        and marker.get("config") == dataclasses.asdict(cfg)
    )


def configured_paths(data_cfg: DataConfig) -> dict[str, str]:
    """The file names ``data_cfg`` sets explicitly (empty = the layout's default), so the reader finds them."""
    keys = ("annotations", "video_features", "text_features", "sentence_features")
    return {k: getattr(data_cfg, k) for k in keys if getattr(data_cfg, k)}


def check_readable(data_cfg: DataConfig) -> None:
    """The generated files must be readable with ``data_cfg`` itself: same widths, and a rate the reader knows."""
    syn = data_cfg.synthetic
    # with data.text_encoder the text features are computed from the sentences, so their width is the encoder's
    for name in ("video_dim", "text_dim") if not data_cfg.text_encoder else ("video_dim",):
        if getattr(data_cfg, name) != getattr(syn, name):
            raise ConfigError(
                f"data.{name}={getattr(data_cfg, name)} differs from data.synthetic.{name}={getattr(syn, name)}: "
                "the reader would reject the generated features; set both to the same value"
            )
    from rgnet.data.formats import DEFAULT_FPS

    fps = data_cfg.fps or DEFAULT_FPS.get(data_cfg.layout)  # the reader's default when data.fps = 0
    if fps is not None and not math.isclose(fps, syn.fps):
        raise ConfigError(
            f"the {data_cfg.layout} reader will assume {fps} fps but data.synthetic.fps={syn.fps}: "
            f"set data.fps={syn.fps} (or data.synthetic.fps={fps})"
        )


def ensure_dataset(data_cfg: DataConfig, *, progress: bool = False) -> Path:
    """Make sure ``data_cfg.root`` holds ``data_cfg.synthetic`` in ``data_cfg.layout``; generate it if not.

    Reused when the marker's config, layout and generator version match; regenerated when they differ (only a
    folder the generator wrote is replaced).  Safe when several processes call it at once: each writes its own
    staging folder and the loser of the final rename keeps the winner's identical result.
    """
    root = Path(data_cfg.root)
    cfg, layout = data_cfg.synthetic, data_cfg.layout
    paths = configured_paths(data_cfg)
    check_readable(data_cfg)
    if _marker_matches(root, cfg, layout, paths):
        return root
    try:
        return write_synthetic(cfg, root, layout, progress=progress, paths=paths)
    except OSError:
        if _marker_matches(root, cfg, layout, paths):  # another process finished first
            return root
        raise



def ensure_configured_dataset(data_cfg: DataConfig) -> None:
    """:func:`ensure_dataset` when the config asks for it (``data.generate_if_missing``; real-data presets do not)."""
    if data_cfg.generate_if_missing:
        ensure_dataset(data_cfg)

# ---------------------------------------------------------------------------------------------------------------
# Diagnostic: how far does the frozen dot product get?
# ---------------------------------------------------------------------------------------------------------------
def frozen_retrieval_recall(
    data: SyntheticData, split: str, window_len_sec: float, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Retrieval Recall@K of the frozen baseline, next to the expected Recall@K of a random window order.

    Windows (:mod:`rgnet.data.windows`, stride half the length) are ranked by their maximum frame cosine with the
    query's sentence feature (the disjoint baseline, DESIGN.md section 3 item 9); a window is positive when it
    overlaps the GT (the retrieval metric's definition).  The random
    baseline is exact: 1 - C(P - pos, K) / C(P, K), averaged over queries.
    """
    from rgnet.data.windows import overlap_mask, rank_windows, window_bounds, window_frames

    length, stride = window_frames(window_len_sec, 0.0, data.fps)
    hits = {k: 0.0 for k in ks}
    chance = {k: 0.0 for k in ks}
    windows_total = 0
    records = data.splits[split]
    normed: dict[str, np.ndarray] = {}
    for rec in records:
        if rec.video_key not in normed:
            v = data.videos[rec.video_key].astype(np.float64)
            normed[rec.video_key] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        frames = normed[rec.video_key]  # (T, Dv) unit rows
        sim = frames @ data.sentences[rec.query_key].astype(np.float64)  # (T,)
        bounds = window_bounds(len(frames), length, stride)  # (P, 2) frames [start, stop)
        scores = np.array([sim[a:b].max() for a, b in bounds])  # (P,)
        gt_start, gt_end = rec.start_sec * data.fps, rec.end_sec * data.fps
        positive = overlap_mask(bounds[:, 0], bounds[:, 1], gt_start, gt_end, len(frames))  # (P,)
        order = rank_windows(scores)  # best first by the frozen-feature score
        num, num_pos = len(bounds), int(positive.sum())
        windows_total += num
        for k in ks:
            hits[k] += float(positive[order[:k]].any())
            chance[k] += 1.0 - math.comb(num - num_pos, min(k, num)) / math.comb(num, min(k, num))
    n = max(len(records), 1)
    out: dict[str, float] = {"queries": float(len(records)), "windows_per_video": windows_total / n}
    for k in ks:
        out[f"R@{k}"] = hits[k] / n
        out[f"random_R@{k}"] = chance[k] / n
    return out
