"""Import the released RGNet checkpoints (github.com/Tanveer81/RGNet) as checkpoints of this project.

A released file is ``torch.save`` of a dict with ``model`` (state dict), ``optimizer``, ``lr_scheduler``, ``epoch``
and ``opt`` (the ``argparse.Namespace`` of its training options); facts in ``../shared/notes/official_checkpoint.md``.
It is read with ``torch.load(weights_only=True)``, letting only ``argparse.Namespace`` through besides tensors and
plain containers, so no pickled code runs.

The import is a table of :class:`TensorRule` built from the model config (:func:`released_layout`): every released
tensor, by name and shape, either maps to one tensor of :class:`rgnet.model.RGNet` (the stacked q/k/v of
``nn.MultiheadAttention``'s ``in_proj_*`` splits into three) or is dropped with the reason it cannot affect the
output.  A tensor the table lacks, a tensor the file lacks and a shape that differs are errors naming the tensor
and the shape expected.  The model and window config come from ``opt`` on top of a preset (``mad`` / ``ego4d``),
with ``model.compat=released`` so that the model computes the released function (DESIGN.md section 3 item 10).

Nothing here imports Ray or MLflow; ``pipelines/import_released.py`` is the command line.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rgnet.config import Config, ConfigError, ModelConfig, from_dict, load_config, save_yaml, to_dict

RELEASED_FILE_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "opt")
PRESETS = ("mad", "ego4d")
# options the import reads from ``opt`` (the released config.py's names)
REQUIRED_OPTIONS = (
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_queries",
    "max_v_l",
    "max_q_l",
    "clip_length",
    "gumbel_eps",
    "topk_window",
    "pos_temperature",
)
# released switches that must be on (when the file records them): the configuration every released script runs
REQUIRED_ON = ("qddetr", "dabdetr", "gumbel", "gumbel_2", "gumbel_3", "gumbel_single_proj")
# switches that must be off: text positions and pre-norm layers are not part of the released configuration
REQUIRED_OFF = ("use_txt_pos", "pre_norm")

# reasons a released tensor is dropped (each proven in the reference notes, and checked by tests/test_released.py)
WHY_DEC0_SA = (
    "decoder layer 0's self-attention reads all-zero content queries: every value is sa_v_proj's bias, so attention "
    "returns that bias whatever the q/k projections and sa_v_proj.weight are"
)
WHY_TXT_POS = "built but never called in the released configuration (text positions are zeros, use_txt_pos off)"
WHY_SALIENCY = "saliency_proj is built but unused in the released MAD/Ego4D configuration"
WHY_B1 = (
    "b1 of the sampling score adds the same <b1, W2 r + b2> / sqrt(D) to every frame of a pair: the hinge loss and "
    "every prediction cancel it (only the raw sampling_score output shifts by that per-pair constant)"
)
WHY_KEY_BIAS = (
    "an attention key bias adds q . b_k to every logit of a query row, which the softmax cancels: it never changes the "
    "output (this model's key projections have no bias)"
)
WHY_LAST_REFINE = "the anchor refinement after the last decoder layer is computed and discarded"
WHY_QUERY_SCALE = "the conditional query scaling starts at the second decoder layer; this model has one layer"


class ReleasedCheckpointError(ValueError):
    """The file is not a released RGNet checkpoint, or does not match the configuration it declares."""


@dataclass(frozen=True)
class TensorRule:
    """One released tensor: its name and shape, and where it goes in our state dict.

    ``targets``: one key of ours (same shape); three keys for a stacked q/k/v tensor (split into equal thirds along
    dim 0, in that order; "" for a third that is dropped, with ``reason``); none when the tensor is dropped, with
    ``reason``.
    """

    released: str
    shape: tuple[int, ...]
    targets: tuple[str, ...]
    reason: str = ""

    @property
    def dropped(self) -> bool:
        """Nothing of the tensor is kept."""
        return not any(self.targets)

    @property
    def label(self) -> str:
        """The released name, saying which third is dropped when only a part is."""
        parts = [f"{'qkv'[i]} third" for i, t in enumerate(self.targets) if not t] if len(self.targets) == 3 else []
        return f"{self.released} ({', '.join(parts)})" if parts else self.released


def released_layout(cfg: ModelConfig, video_dim: int, text_dim: int, max_query_tokens: int) -> list[TensorRule]:
    """Every tensor of a released checkpoint at these sizes, in the released state dict's order of modules.

    ``max_query_tokens`` sizes the (unused) text position table, ``max_q_l`` in the released options.
    """
    d, f, h_dec = cfg.hidden_dim, cfg.ffn_dim, cfg.decoder_layers
    rules: list[TensorRule] = []

    def put(released: str, shape: tuple[int, ...], *targets: str, reason: str = "") -> None:
        rules.append(TensorRule(released, shape, tuple(targets), reason))

    def linear(released: str, ours: str | None, out_dim: int, in_dim: int, reason: str = "") -> None:
        put(f"{released}.weight", (out_dim, in_dim), *([f"{ours}.weight"] if ours else []), reason=reason)
        put(f"{released}.bias", (out_dim,), *([f"{ours}.bias"] if ours else []), reason=reason)

    def norm(released: str, ours: str | None, dim: int, reason: str = "") -> None:
        put(f"{released}.weight", (dim,), *([f"{ours}.weight"] if ours else []), reason=reason)
        put(f"{released}.bias", (dim,), *([f"{ours}.bias"] if ours else []), reason=reason)

    def mlp(released: str, ours: str | None, dims: list[int], reason: str = "") -> None:
        # released MLP: layers.{j} = Linear(dims[j], dims[j+1]); ours: nn.Sequential with ReLUs at odd indices
        for j in range(len(dims) - 1):
            linear(f"{released}.layers.{j}", f"{ours}.{2 * j}" if ours else None, dims[j + 1], dims[j], reason)

    def attention_layer(released: str, ours: str) -> None:
        # nn.TransformerEncoderLayer-style layer: stacked in-projection, out_proj, FFN, two LayerNorms
        put(f"{released}.self_attn.in_proj_weight", (3 * d, d), *(f"{ours}.{p}_proj.weight" for p in "qkv"))
        put(f"{released}.self_attn.in_proj_bias", (3 * d,), f"{ours}.q_proj.bias", "", f"{ours}.v_proj.bias",
            reason=WHY_KEY_BIAS)  # fmt: skip
        linear(f"{released}.self_attn.out_proj", f"{ours}.out_proj", d, d)
        linear(f"{released}.linear1", f"{ours}.ffn.linear1", f, d)
        linear(f"{released}.linear2", f"{ours}.ffn.linear2", d, f)
        norm(f"{released}.norm1", f"{ours}.norm1", d)
        norm(f"{released}.norm2", f"{ours}.norm2", d)

    # input projections: LinearLayer = LayerNorm -> net (Dropout, Linear) [-> ReLU], two per modality
    for released, ours, in_dim in (
        ("input_vid_proj", "video_proj", video_dim),
        ("input_txt_proj", "text_proj", text_dim),
    ):
        norm(f"{released}.0.LayerNorm", f"{ours}.0", in_dim)
        linear(f"{released}.0.net.1", f"{ours}.2", d, in_dim)
        norm(f"{released}.1.LayerNorm", f"{ours}.4", d)
        linear(f"{released}.1.net.1", f"{ours}.6", d, d)
    put("txt_position_embed.position_embeddings.weight", (max_query_tokens, d), reason=WHY_TXT_POS)
    norm("txt_position_embed.LayerNorm", None, d, WHY_TXT_POS)
    # retrieval token, cross-attention (Eq. 1), sampler (Eq. 2), retrieval attention (Eq. 4)
    put("global_rep_token", (d,), "encoder.token")
    put("global_rep_pos", (d,), "encoder.token_pos")
    for i in range(cfg.cross_layers):
        attention_layer(f"transformer.t2v_encoder.layers.{i}", f"encoder.cross.layers.{i}")
    linear("transformer.prop_instance", "encoder.sampler.relevance", 1, d)
    for i in range(cfg.retrieval_layers):
        attention_layer(f"transformer.encoder.layers.{i}", f"encoder.layers.{i}")
    # context score (saliency_proj3), sampling score of Eq. 7 (saliency_proj1 = W1 [b1 dropped], saliency_proj2 = W2)
    linear("saliency_proj", None, 1, d, WHY_SALIENCY)
    put("saliency_proj1.weight", (d, d), "sampling_frame_proj.weight")
    put("saliency_proj1.bias", (d,), reason=WHY_B1)
    linear("saliency_proj2", "sampling_context_proj", d, d)
    put("saliency_proj3.weight", (1, d), "context_head.weight")
    put("saliency_proj3.bias", (1,), "context_head.offset")  # fixed here: InfoNCE gives a bias no gradient
    # DAB-DETR decoder
    for i in range(h_dec):
        rel, ours = f"transformer.decoder.layers.{i}", f"decoder.layers.{i}"
        for proj, mine in (("qcontent", "q_content"), ("qpos", "q_pos"), ("kcontent", "k_content"), ("kpos", "k_pos")):
            if i == 0:
                linear(f"{rel}.sa_{proj}_proj", None, d, d, WHY_DEC0_SA)
            elif proj.startswith("k"):
                put(f"{rel}.sa_{proj}_proj.weight", (d, d), f"{ours}.sa_{mine}.weight")
                put(f"{rel}.sa_{proj}_proj.bias", (d,), reason=WHY_KEY_BIAS)
            else:
                linear(f"{rel}.sa_{proj}_proj", f"{ours}.sa_{mine}", d, d)
        if i == 0:
            put(f"{rel}.sa_v_proj.weight", (d, d), reason=WHY_DEC0_SA)
            put(f"{rel}.sa_v_proj.bias", (d,), f"{ours}.sa_value")
        else:
            linear(f"{rel}.sa_v_proj", f"{ours}.sa_v", d, d)
        linear(f"{rel}.self_attn.out_proj", f"{ours}.sa_out", d, d)
        for proj, mine in (
            ("qcontent", "q_content"),
            ("qpos", "q_pos"),
            ("qpos_sine", "q_sine"),
            ("v", "v"),
        ):
            linear(f"{rel}.ca_{proj}_proj", f"{ours}.ca_{mine}", d, d)
        for proj, mine in (("kcontent", "k_content"), ("kpos", "k_pos")):
            put(f"{rel}.ca_{proj}_proj.weight", (d, d), f"{ours}.ca_{mine}.weight")
            put(f"{rel}.ca_{proj}_proj.bias", (d,), reason=WHY_KEY_BIAS)
        linear(f"{rel}.cross_attn.out_proj", f"{ours}.ca_out", d, d)
        linear(f"{rel}.linear1", f"{ours}.ffn.linear1", f, d)
        linear(f"{rel}.linear2", f"{ours}.ffn.linear2", d, f)
        for k in (1, 2, 3):
            norm(f"{rel}.norm{k}", f"{ours}.norm{k}", d)
    norm("transformer.decoder.norm", "decoder.norm", d)
    scaled = h_dec > 1
    mlp(
        "transformer.decoder.query_scale",
        "decoder.query_scale" if scaled else None,
        [d, d, d],
        "" if scaled else WHY_QUERY_SCALE,
    )
    mlp("transformer.decoder.ref_point_head", "decoder.ref_point_head", [d, d, d])
    mlp("transformer.decoder.ref_anchor_head", "decoder.ref_width_head", [d, d, 1])
    for i in range(h_dec):
        last = i == h_dec - 1
        refine = None if last else f"decoder.refine.{i}"
        mlp(f"transformer.decoder.bbox_embed.{i}", refine, [d, d, d, 2], WHY_LAST_REFINE if last else "")
    # prediction heads and the learned anchors
    linear("class_embed", "class_head", 2, d)
    mlp("span_embed", "span_head", [d, d, d, 2])
    put("query_embed.weight", (cfg.num_queries, 2), "decoder.anchors.weight")
    return rules


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def convert_state_dict(released: Mapping[str, Tensor], rules: list[TensorRule], source: object) -> dict[str, Tensor]:
    """The released state dict renamed (and q/k/v split) into ours; every mismatch is one error naming the tensors."""
    expected = {r.released: r for r in rules}
    problems = [
        f"missing tensor '{n}' (expected shape {_shape(r.shape)})" for n, r in expected.items() if n not in released
    ]
    for name, tensor in released.items():
        if not isinstance(tensor, Tensor):
            problems.append(f"entry '{name}' is a {type(tensor).__name__}, not a tensor")
        elif name not in expected:
            problems.append(
                f"unexpected tensor '{name}' of shape {_shape(tuple(tensor.shape))} (not in the released model)"
            )
        elif tuple(tensor.shape) != expected[name].shape:
            problems.append(
                f"tensor '{name}' has shape {_shape(tuple(tensor.shape))}, expected {_shape(expected[name].shape)}"
            )
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ReleasedCheckpointError(
            f"{source}: the released state dict does not match the configuration its options declare "
            f"({len(problems)} problem(s)):\n  {shown}"
        )
    ours: dict[str, Tensor] = {}
    for rule in rules:
        if rule.dropped:
            continue
        tensor = released[rule.released].detach().to(torch.float32)
        parts = tensor.chunk(len(rule.targets), dim=0) if len(rule.targets) > 1 else (tensor,)
        for key, part in zip(rule.targets, parts, strict=True):
            if key:  # "": a dropped third (a key bias)
                ours[key] = part.clone().contiguous()
    return ours


# ---------------------------------------------------------------------------------------------------------------
# Reading the file and deriving the config
# ---------------------------------------------------------------------------------------------------------------
def read_released(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any], int | None]:
    """(state dict, options as a dict, epoch) of a released checkpoint, read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe is None:
            raise ReleasedCheckpointError(f"{path} is not a torch checkpoint file: {e}") from e
        raise ReleasedCheckpointError(
            f"{path} is not a released RGNet checkpoint that can be read safely: it holds a {unsafe.group(1)} object "
            "(only tensors, plain containers and argparse.Namespace are let through; nothing else is unpickled)"
        ) from e
    except Exception as e:  # torch.load fails in many ways on a file that is not a torch checkpoint
        raise ReleasedCheckpointError(f"{path} is not a torch checkpoint file ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "format_version" in obj:
        raise ReleasedCheckpointError(
            f"{path} is a checkpoint of this project (format_version {obj['format_version']}), not a released RGNet "
            "checkpoint: use it as it is (rgnet evaluate --checkpoint, rgnet train train.init_from=...)"
        )
    if not isinstance(obj, Mapping) or "model" not in obj or "opt" not in obj:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ReleasedCheckpointError(
            f"{path} is not a released RGNet checkpoint: that is a dict with keys {', '.join(RELEASED_FILE_KEYS)}; "
            f"this file holds {keys}"
        )
    state, opt = obj["model"], obj["opt"]
    if not isinstance(state, Mapping):
        raise ReleasedCheckpointError(f"{path}: 'model' must be a state dict, got {type(state).__name__}")
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, Mapping):
        raise ReleasedCheckpointError(f"{path}: 'opt' must be the training options (argparse.Namespace)")
    epoch = obj.get("epoch")
    return dict(state), dict(opt), int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def default_preset(opt: Mapping[str, Any], source: object) -> str:
    """``mad`` or ``ego4d`` from the options' ``dset_name``."""
    name = str(opt.get("dset_name", "")).lower()
    if "mad" in name:
        return "mad"
    if any(k in name for k in ("ego4d", "ego", "nlq", "naq")):
        return "ego4d"
    raise ReleasedCheckpointError(
        f"{source}: cannot tell the dataset from dset_name={opt.get('dset_name')!r}; pass --preset mad or ego4d"
    )


def _option(opt: Mapping[str, Any], name: str, kind: type, source: object) -> Any:
    if name not in opt:
        raise ReleasedCheckpointError(f"{source}: the released options lack '{name}', which the import needs")
    value = opt[name]
    allowed = (int,) if kind is int else (int, float)
    if not isinstance(value, allowed) or isinstance(value, bool):
        raise ReleasedCheckpointError(f"{source}: released option {name}={value!r} is not {kind.__name__}")
    return kind(value)


def config_from_options(
    opt: Mapping[str, Any], preset: str, video_dim: int, text_dim: int, source: object = "released checkpoint"
) -> Config:
    """The project config of a released model: ``preset`` (mad | ego4d) overlaid with what ``opt`` says.

    From the options: sizes (hidden_dim, nheads, enc_layers for both the cross-attention and the retrieval
    attention stacks, dec_layers, dim_feedforward, num_queries), gumbel_eps (sampler temperature), pos_temperature,
    max_q_l (data.max_query_tokens), the window (max_v_l frames of clip_length seconds: windows.length_sec, and
    data.fps = 1 / clip_length, the rate the released code converts frames to seconds with), topk_window, and, when
    recorded, dropout, input_dropout and nms_thd.  Feature widths come from the weights.  Always: compat released,
    additive retrieval mask, raw tokens (the model normalises them), the rg encoder, the Gumbel sampler and the
    context score.  Optimisation, losses and training length stay the preset's (fine-tuning choices).
    """
    if preset not in PRESETS:
        raise ReleasedCheckpointError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    for name in REQUIRED_ON:
        if name in opt and not opt[name]:
            raise ReleasedCheckpointError(
                f"{source}: the released option {name} is off; the import supports the configuration every released "
                f"script runs ({', '.join('--' + n for n in REQUIRED_ON)})"
            )
    for name in REQUIRED_OFF:
        if opt.get(name):
            raise ReleasedCheckpointError(f"{source}: the released option {name} is on; no released script sets it")
    if "n_input_proj" in opt and opt["n_input_proj"] != 2:
        raise ReleasedCheckpointError(f"{source}: n_input_proj={opt['n_input_proj']!r}; the released scripts use 2")
    floats = ("clip_length", "gumbel_eps", "pos_temperature")
    get = {n: _option(opt, n, float if n in floats else int, source) for n in REQUIRED_OPTIONS}
    if get["clip_length"] <= 0 or not math.isfinite(get["clip_length"]):
        raise ReleasedCheckpointError(
            f"{source}: clip_length={get['clip_length']} must be a positive number of seconds"
        )
    enc = get["enc_layers"]
    model: dict[str, Any] = {
        "hidden_dim": get["hidden_dim"],
        "num_heads": get["nheads"],
        "ffn_dim": get["dim_feedforward"],
        "cross_layers": enc,  # the released code builds both stacks from --enc_layers
        "retrieval_layers": enc,
        "decoder_layers": get["dec_layers"],
        "num_queries": get["num_queries"],
        "pos_temperature": get["pos_temperature"],
        "encoder": "rg",
        "sampler": {"kind": "gumbel", "temperature": get["gumbel_eps"]},
        "mask_mode": "additive",
        "retrieval": "context",
        "compat": "released",
    }
    for ours, theirs in (("dropout", "dropout"), ("input_dropout", "input_dropout")):
        if theirs in opt:
            model[ours] = _option(opt, theirs, float, source)
    evaluation: dict[str, Any] = {"top_k_windows": get["topk_window"]}
    if "nms_thd" in opt:
        evaluation["nms_iou"] = _option(opt, "nms_thd", float, source)
    overlay = {
        "data": {
            "video_dim": video_dim,
            "text_dim": text_dim,
            "max_query_tokens": get["max_q_l"],
            "normalize_text": False,
            "fps": 1.0 / get["clip_length"],
        },
        "windows": {"length_sec": get["max_v_l"] * get["clip_length"], "stride_sec": 0.0},
        "model": model,
        "eval": evaluation,
        "train": {"run_name": f"released-{preset}"},
    }
    try:
        return from_dict(overlay, load_config(preset), source=f" (derived from the options of {source})")
    except ConfigError as e:
        raise ReleasedCheckpointError(f"{source}: the released options give an unusable config: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ReleasedImport:
    """An imported released checkpoint: the project config, our state dict, and the rule of every tensor."""

    source: Path
    preset: str
    config: Config
    state_dict: dict[str, Tensor]
    rules: list[TensorRule]
    released_epoch: int | None

    @property
    def dropped(self) -> list[TensorRule]:
        """Rules that drop a tensor, or a third of one (a stacked key bias)."""
        return [r for r in self.rules if r.reason]

    @property
    def mapped(self) -> list[TensorRule]:
        """Rules that keep a tensor, or two thirds of one."""
        return [r for r in self.rules if not r.dropped]


def _width(state: Mapping[str, Any], name: str, source: object) -> int:
    t = state.get(name)
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ReleasedCheckpointError(
            f"{source}: missing tensor '{name}' (a 1-D LayerNorm weight, whose length is the feature width)"
        )
    return int(t.shape[0])


def import_released(path: str | os.PathLike[str], preset: str | None = None) -> ReleasedImport:
    """Read, check and convert a released checkpoint (nothing is written; see :func:`write_import`)."""
    from rgnet.model import build_model

    path = Path(path)
    state, opt, epoch = read_released(path)
    preset = preset or default_preset(opt, path)
    video_dim = _width(state, "input_vid_proj.0.LayerNorm.weight", path)
    text_dim = _width(state, "input_txt_proj.0.LayerNorm.weight", path)
    cfg = config_from_options(opt, preset, video_dim, text_dim, path)
    rules = released_layout(cfg.model, video_dim, text_dim, cfg.data.max_query_tokens)
    ours = convert_state_dict(state, rules, path)
    model = build_model(cfg.model, video_dim, text_dim)
    reference = model.state_dict()
    if set(ours) != set(reference) or any(ours[k].shape != reference[k].shape for k in reference):
        raise RuntimeError(  # the rule table and the model disagree: a bug here, not in the file
            f"released_layout does not cover RGNet exactly: missing {sorted(set(reference) - set(ours))[:5]}, "
            f"extra {sorted(set(ours) - set(reference))[:5]}"
        )
    model.load_state_dict(ours)
    return ReleasedImport(path, preset, cfg, model.state_dict(), rules, epoch)


def write_import(result: ReleasedImport, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``out_dir/checkpoint.pt`` (the project checkpoint format) and ``out_dir/config.yaml``, atomically."""
    from rgnet.train.checkpoint import CHECKPOINT_FILE, FORMAT_VERSION, save_checkpoint

    out = Path(out_dir)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": result.state_dict,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "epoch": result.released_epoch if result.released_epoch is not None else 0,
        "global_step": 0,
        "config": to_dict(result.config),
        "metrics": {},
        "imported_from": {
            "file": str(result.source.resolve()),
            "released_epoch": result.released_epoch,
            "dropped": {r.label: r.reason for r in result.dropped},
        },
    }
    ckpt = save_checkpoint(payload, out / CHECKPOINT_FILE)
    config_path = out / "config.yaml"
    save_yaml(result.config, config_path)
    return ckpt, config_path
