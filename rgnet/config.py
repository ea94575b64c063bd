"""One typed configuration tree for every job.

The dataclass defaults below *are* the embedded default: a small synthetic Ego4D-like dataset, a local Ray, and a
local SQLite MLflow store.  Presets (YAML files in ``rgnet/presets/``) and ``key=value`` overrides only change
values; an unknown key is an error that names the nearest valid key.  The resolved config round-trips through a
plain dict (what Ray passes to workers) and YAML (what we log and checkpoint).

Field names follow the paper's vocabulary where one exists (window = proposal candidate, context score, sampling
score); each field's comment says what it does and, where relevant, where the value comes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

Layout = Literal["mad", "ego4d", "native"]
Profile = Literal["rgnet", "geq"]


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message says which and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticConfig:
    """Knobs of the planted-moment generator (``rgnet.data.synthetic``)."""

    layout: Layout = "native"  # which on-disk layout the generator writes
    seed: int = 0  # same seed -> byte-identical files
    num_train_videos: int = 48
    num_val_videos: int = 12
    num_test_videos: int = 12
    queries_per_video: int = 10
    video_min_sec: float = 300.0  # video length is drawn uniformly in [min, max]
    video_max_sec: float = 480.0
    fps: float = 1.875  # Ego4D EgoVLP rate: one feature per 16 frames at 30 fps
    moment_mean_sec: float = 8.0  # moment length ~ clipped log-normal around this mean
    moment_min_sec: float = 2.0
    moment_max_sec: float = 30.0
    video_dim: int = 256  # EgoVLP video features are 256-d
    text_dim: int = 512  # CLIP B/32 token features are 512-d
    # The world below is the embedded default's: RGNet learns it from scratch in about 5 minutes on 2 CPU cores (the
    # README's learning table). A harder world (latent 64, 64 concepts, 6-14 tokens, plant 1, scene/style 0.3, noise
    # 0.6/0.5, alignment 0.35, 2 distractors: synthetic-mad pins all of it, tiny its scales, noise, plant and
    # alignment) stays at chance in that budget: a cross-encoder learning the text-to-video map from random
    # initialisation needs far more steps.
    latent_dim: int = 16  # dimension of the shared concept space both towers project from
    num_concepts: int = 16  # vocabulary of plantable concepts
    query_min_tokens: int = 2
    query_max_tokens: int = 6
    scene_mean_sec: float = 20.0  # background scenes are random walks of about this length
    scene_scale: float = 0.2  # per-direction std of a scene's content (background a query can be confused with)
    # per-direction std of a scene's style (nuisance the text tower's unaligned part points at; weakens frozen ranking)
    nuisance_scale: float = 0.1
    frame_noise: float = 0.2  # isotropic frame noise: per-coordinate std frame_noise / sqrt(latent_dim)
    text_noise: float = 0.1  # isotropic token (and sentence) noise: per-coordinate std text_noise / sqrt(latent_dim)
    plant_strength: float = 3.0  # how strongly the concept is added to moment frames
    alignment: float = 0.15  # share of the video tower that is aligned with the text tower (0 = unrelated)
    distractors_per_query: int = 1  # spans elsewhere in the video sharing part of the query's concept
    distractor_overlap: float = 0.5  # fraction of the concept a distractor carries


@dataclass
class DataConfig:
    """Where the dataset lives and how it is read."""

    layout: Layout = "native"  # mad | ego4d | native (DESIGN.md section 2)
    root: str = "data/synthetic-ego4d"  # dataset folder; relative paths resolve against the working directory
    # File names inside ``root``; ``{split}`` is replaced by the split name.  Empty = the layout's default.
    annotations: str = ""
    video_features: str = ""
    text_features: str = ""
    # Optional sentence-level query features in the *video* tower's space (CLIP EOT for MAD, EgoVLP text CLS for
    # Ego4D): used only by frozen-feature ranking (model.retrieval=none, the disjoint baseline) and eval.fusion.
    sentence_features: str = ""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    fps: float = 0.0  # feature rate; 0 = the layout's default (MAD 5, Ego4D 1.875, native: the file attribute)
    video_dim: int = 256  # expected video feature width; a mismatch is an error naming the file and key
    text_dim: int = 512  # expected text token width
    # "" = precomputed token features (data.text_features); "minilm" = token features computed from each query's
    # sentence by the offline all-MiniLM-L6-v2 package (rgnet-ray[text]), cached beside the data; a model trained
    # this way takes raw text in `rgnet predict --query`.  Needs data.text_dim=384.
    text_encoder: Literal["", "minilm"] = ""
    max_query_tokens: int = 32  # longer token sequences are truncated (released code: 25 MAD, 20 Ego4D)
    normalize_text: bool = True  # L2-normalise each text token (released code does; video is left as is)
    mad_gt_field: Literal["timestamps", "ext_timestamps"] = "timestamps"  # which MAD field is the ground truth
    drop_zero_length: bool = True  # filter zero-length GT moments (about 14% of Ego4D-NLQ) with a counted warning
    generate_if_missing: bool = True  # `rgnet train` generates the synthetic dataset when ``root`` is absent
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class WindowConfig:
    """Sliding windows = proposal candidates (paper Sec. 3.1)."""

    length_sec: float = 48.0  # Ego4D: 90 features at 1.875 fps; MAD: 180 s (900 frames at 5 fps)
    stride_sec: float = 0.0  # 0 = half the length (the released code's stride)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SamplerConfig:
    """The Gumbel sampler of Eq. 2 / 11-13."""

    kind: Literal["gumbel", "none"] = "gumbel"  # none = every frame is relevant (ablation, Tab. 3)
    temperature: float = 0.3  # tau; every released script uses 0.3


@dataclass
class ModelConfig:
    """RGNet sizes and the component choices that the paper's ablations swap."""

    # The defaults are the embedded default: a reduced RGNet that trains on the synthetic Ego4D-like data in about
    # 5 minutes on 2 CPU cores. The paper's sizes (D 256, 8 heads, FFN 2048, 6 decoder layers) are in the mad and
    # ego4d presets.
    hidden_dim: int = 128  # D (paper: 256)
    num_heads: int = 4  # paper: 8
    ffn_dim: int = 256  # paper: 2048 (released scripts; code default 1024)
    dropout: float = 0.1
    # dropout on attention probabilities; the released code uses `dropout` (0.1) there, but on CPU any value > 0
    # forces the unfused attention path (about +1.3 GiB and +25% time per full-size 64-pair step); 0 keeps it fused
    attention_dropout: float = 0.0
    input_dropout: float = 0.1  # dropout inside the input projections (paper: 0.5)
    cross_layers: int = 2  # T2V cross-attention layers (Eq. 1)
    retrieval_layers: int = 2  # retrieval self-attention layers (Eq. 4)
    decoder_layers: int = 3  # paper: 6
    num_queries: int = 5  # Q anchors per window
    pos_temperature: float = 10000.0  # sine position temperature; the MAD recipe uses 100
    encoder: Literal["rg", "plain"] = "rg"  # rg = retrieval token + gated attention; plain = no token, no gate
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    mask_mode: Literal["hard", "additive", "none"] = "hard"  # Eq. 3: paper (-inf), released code (+1), ablation
    retrieval: Literal["context", "none"] = "context"  # none = rank windows by frozen-feature similarity
    # clean = the model above; released = the released code's numerics, so that imported released checkpoints
    # compute the released function (`rgnet import released`): the text-to-video padding mask tiled head-major,
    # tokens normalised in the model as x / (||x|| + 1e-5) (needs data.normalize_text=false), the additive retrieval
    # mask (needs mask_mode=additive) and no clamp on the decoder's anchor width (README "Use the released checkpoints")
    compat: Literal["clean", "released"] = "clean"


@dataclass
class LossConfig:
    """Loss and matcher weights (Eq. 6-10)."""

    span_l1_weight: float = 10.0
    giou_weight: float = 1.0
    fg_weight: float = 4.0  # foreground/background cross-entropy
    eos_coef: float = 0.1  # weight of the background class
    match_l1: float = 10.0  # Hungarian matching costs
    match_giou: float = 1.0
    match_fg: float = 4.0
    aux_loss: bool = True  # grounding loss on every decoder layer, not only the last
    sampling_weight: float = 1.0  # intra-proposal hinge (Eq. 6)
    sampling_margin: float = 0.2
    contrastive_weight: float = 1.0  # inter-proposal InfoNCE (Eq. 8); 10 for MAD, 1 for Ego4D
    contrastive_temperature: float = 0.07
    negatives: Literal["in_batch", "same_video", "both"] = "in_batch"  # released code: in_batch


@dataclass
class OptimConfig:
    lr: float = 3e-4  # paper: 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping (paper: 0.1)
    lr_drop_epochs: list[int] = field(default_factory=list)  # MultiStepLR milestones (MAD [25], Ego4D [120])
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # linear warm-up (not in the released code; 0 keeps it off)


@dataclass
class TrainConfig:
    epochs: int = 10
    # queries per optimizer step, whatever the number of workers (the global batch; N Ray workers take B/N each and
    # compute the one-process step exactly); the encoder sees batch_size^2 pairs with in_batch negatives
    batch_size: int = 8
    seed: int = 2018
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype on CUDA; CPU always runs fp32
    eval_every: int = 1  # validate every N epochs (and after the last)
    max_steps_per_epoch: int = 0  # 0 = the whole split
    output_dir: str = "runs"  # local runs write checkpoints and reports under output_dir/run_name
    run_name: str = "synthetic-ego4d"
    selection_metric: str = "R1@0.3"  # best checkpoint by this validation metric (higher is better)
    progress: bool = True  # per-epoch progress bar with loss and throughput
    # torch threads per training process: 0 = its CPUs (all cores with --local, floor(ray.cpus_per_worker) but at
    # least 1 on a Ray worker).  Results depend on it (summation order): runs that must agree use the same count
    threads: int = 0
    # a project checkpoint (e.g. written by `rgnet import released`) whose weights start the run: weights only, fresh
    # optimizer and schedule, every name and shape checked; a run resuming from its own checkpoint ignores it
    init_from: str = ""


@dataclass
class EvalConfig:
    profile: Profile = "rgnet"  # rgnet: IoU > m (official RGNet/CONE/Ego4D); geq: IoU >= m (MAD/VLG-Net, SOONet)
    top_k_windows: int = 5  # windows decoded per query (released: MAD 30, Ego4D 20)
    nms_iou: float = 0.5
    max_predictions: int = 100  # prediction cap per query, reported next to every metric
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10, 50, 100])
    iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5])  # MAD adds 0.1
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10, 30])
    fusion: Literal["none", "matching"] = "none"  # matching = add the released code's frozen-feature score
    # (query, window) pairs held at once at inference (one encoder pass, and a query group's kept top-k encodings):
    # bounds memory on long videos and for many queries
    window_chunk: int = 256
    # frames (pairs x window length) per encoder pass at inference, at most window_chunk pairs: the CPU efficiency
    # knob (passes of a few thousand frames keep the activations near the cache; measured in the README,
    # "Performance"); 0 = window_chunk pairs per pass
    pass_frames: int = 7200
    # CPU inference kernels: fused = an inference copy whose linear layers run as oneDNN GEMMs with the bias and ReLU
    # fused (rgnet.model.fused; same function, float32); eager = the training modules as they are
    kernels: Literal["fused", "eager"] = "fused"
    oracle: bool = False  # decode the ground-truth window only (oracle grounding)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty = sqlite:///<absolute cwd>/mlflow.db; clusters use http://head:5000
    experiment: str = "rgnet"


@dataclass
class RayConfig:
    address: str = ""  # empty = start a local Ray; "auto" or ray://... to join a cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so Ray Data tasks keep a CPU on a 2-core machine
    gpus_per_worker: float = 1.0  # used only when use_gpu
    data_cpus: float = 0.5  # CPUs per Ray Data read task
    data_workers: int = 2  # at most this many Ray Data map actors read features
    # how Ray places the workers: PACK fills a node first; SPREAD puts them on different nodes where it can
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    storage_path: str = "~/ray_results"  # shared storage (S3/GCS/NFS) on a multi-node cluster
    checkpoints_to_keep: int = 2


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------------------------
# Validation (says how to fix the input)
# ---------------------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    m = cfg.model
    if m.hidden_dim % m.num_heads:
        raise ConfigError(f"model.hidden_dim={m.hidden_dim} must be divisible by model.num_heads={m.num_heads}")
    if m.hidden_dim % 2:
        raise ConfigError(f"model.hidden_dim={m.hidden_dim} must be even (sine anchor embedding)")
    for name in ("cross_layers", "retrieval_layers", "decoder_layers", "num_queries"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(m, name)}")
    if m.compat == "released" and (m.mask_mode != "additive" or cfg.data.normalize_text):
        raise ConfigError(
            "model.compat=released reproduces the released code, which adds its retrieval mask (model.mask_mode="
            "additive) and normalises raw tokens inside the model (data.normalize_text=false); got model.mask_mode="
            f"{m.mask_mode}, data.normalize_text={str(cfg.data.normalize_text).lower()}"
        )
    if m.sampler.temperature <= 0:
        raise ConfigError(f"model.sampler.temperature must be > 0, got {m.sampler.temperature}")
    if cfg.windows.length_sec <= 0:
        raise ConfigError(f"windows.length_sec must be > 0, got {cfg.windows.length_sec}")
    if cfg.windows.stride_sec < 0 or cfg.windows.stride_sec > cfg.windows.length_sec:
        raise ConfigError(
            f"windows.stride_sec={cfg.windows.stride_sec} must be in [0, windows.length_sec]; 0 means half the length"
        )
    if cfg.train.batch_size < 2 and cfg.loss.contrastive_weight > 0 and cfg.loss.negatives != "same_video":
        raise ConfigError("train.batch_size must be >= 2 for in-batch negatives (or set loss.contrastive_weight=0)")
    if cfg.eval.top_k_windows < 1 or cfg.eval.max_predictions < 1:
        raise ConfigError("eval.top_k_windows and eval.max_predictions must be >= 1")
    if not 0 < cfg.eval.nms_iou <= 1:
        raise ConfigError(f"eval.nms_iou must be in (0, 1], got {cfg.eval.nms_iou}")
    if any(not 0 <= t < 1 for t in cfg.eval.iou_thresholds):
        raise ConfigError(f"eval.iou_thresholds must lie in [0, 1), got {cfg.eval.iou_thresholds}")
    if cfg.ray.num_workers < 0:
        raise ConfigError(f"ray.num_workers must be >= 0, got {cfg.ray.num_workers}")
    if cfg.train.threads < 0:
        raise ConfigError(f"train.threads must be >= 0 (0 = the process's CPUs), got {cfg.train.threads}")
    if cfg.ray.cpus_per_worker <= 0:
        raise ConfigError(f"ray.cpus_per_worker must be > 0, got {cfg.ray.cpus_per_worker}")


# ---------------------------------------------------------------------------------------------------------------
# Dict / YAML conversion with strict keys and types
# ---------------------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (nested dicts of str/int/float/bool/list)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the tree, e.g. ``model.sampler.temperature``."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _is_plain_str(key: str) -> bool:
    """Whether the dotted ``key`` is a free-text field (a path, URI or name), not a number, list or choice."""
    tp: Any = Config
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp is str


def _unknown(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = list(valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and convert int->float, str numbers from the CLI)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} does not fit {tp}: {'; '.join(errors)}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _merge(obj: Any, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    """A copy of dataclass ``obj`` with ``data`` merged in, recursively, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping{source}, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            valid = [k[len(prefix) :] for k in all_keys(Config) if k.startswith(prefix)]
            raise _unknown(f"{prefix}{key}", (prefix + v for v in valid), source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _merge(getattr(obj, key), value, f"{prefix}{key}.", source)
        else:
            changes[key] = _coerce(value, tp, f"{prefix}{key}")
    if isinstance(obj, Config):
        # Build without running validation on each partial replacement; validate once at the end.
        new = object.__new__(Config)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, changes.get(f.name, getattr(obj, f.name)))
        return new
    return dataclasses.replace(obj, **changes)


def from_dict(data: Mapping[str, Any], base: Config | None = None, source: str = "") -> Config:
    """Overlay a (possibly partial) nested dict on ``base`` (default: the embedded default)."""
    cfg = _merge(base if base is not None else Config(), data, "", source)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``model.sampler.temperature=0.5`` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Each override's key and type is checked as it comes; the rules that tie keys together (validate) once at the
    end, so their order does not matter (``model.compat=released model.mask_mode=additive``)."""
    valid = set(all_keys())
    for text in overrides:
        key, value = parse_override(text)
        if key not in valid:
            raise _unknown(key, valid, " (from a key=value override)")
        if not isinstance(value, str) and _is_plain_str(key):  # a path or name is the text as given: `a b: c.pt`, 007
            value = text.split("=", 1)[1].strip()
        cfg = _merge(cfg, _nest(key, value), "", f" (override '{text}')")
    validate(cfg)
    return cfg


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        near = difflib.get_close_matches(name, available_presets(), n=1, cutoff=0.0)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(available_presets())}){hint}")
    return path


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Embedded default <- preset <- config file <- key=value overrides."""
    cfg = Config()
    if preset:
        path = preset_path(preset)
        cfg = from_dict(_read_yaml(path), cfg, source=f" (in preset {path})")
    if config_file:
        path = Path(config_file)
        cfg = from_dict(_read_yaml(path), cfg, source=f" (in {path})")
    return apply_overrides(cfg, overrides)


def save_yaml(cfg: Config, path: str | os.PathLike[str]) -> None:
    from rgnet.io import atomic_write_text

    atomic_write_text(Path(path), to_yaml(cfg))
