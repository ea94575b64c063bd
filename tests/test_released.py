"""Importing released RGNet checkpoints, model.compat=released, and fine-tuning from a checkpoint (train.init_from).

No released code is needed: a "released-format" file is built from our own randomly initialised model by naming its
tensors with the released names (the import map inverted, q/k/v stacked, the dropped tensors filled with random
values of the right shapes) and saving it in the released file layout (model / optimizer / lr_scheduler / epoch /
opt = argparse.Namespace).
"""

from __future__ import annotations

import argparse
import fractions
import json
import math
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from helpers import small_model_config

from pipelines import cli
from pipelines import evaluate as evaluate_cli
from pipelines import predict as predict_cli
from pipelines import train as train_cli
from rgnet.config import Config, ConfigError, ModelConfig, apply_overrides, from_dict, load_config
from rgnet.data.dataset import open_split
from rgnet.data.synthetic import ensure_dataset
from rgnet.model import build_model, build_pairs
from rgnet.model.cross_attention import CrossAttentionLayer, released_cross_attention_mask
from rgnet.model.embeddings import released_token_norm
from rgnet.predict import ground
from rgnet.released import (
    ReleasedCheckpointError,
    import_released,
    released_layout,
)
from rgnet.search_space import load_space, trial_overrides
from rgnet.train import checkpoint as ckpt
from rgnet.train.loop import evaluate_model, seed_everything
from rgnet.train.run import train_local

DV, DT, MAX_Q = 12, 10, 6  # raw feature widths and the released max_q_l of the small test model


def small_cfg(**kw: object) -> ModelConfig:
    released = {
        "num_heads": 4,
        "cross_layers": 2,
        "pos_temperature": 100.0,
        "mask_mode": "additive",
        "compat": "released",
    }
    return small_model_config(**{**released, **kw})


def released_options(cfg: ModelConfig, **changes: object) -> argparse.Namespace:
    """The released training options a checkpoint of this model would carry (a subset of the 111, plus extras)."""
    opt: dict[str, object] = {
        "dset_name": "mad",
        "hidden_dim": cfg.hidden_dim,
        "nheads": cfg.num_heads,
        "enc_layers": cfg.cross_layers,
        "dec_layers": cfg.decoder_layers,
        "dec_layers_2": 2,
        "dim_feedforward": cfg.ffn_dim,
        "num_queries": cfg.num_queries,
        "max_v_l": 40,
        "max_q_l": MAX_Q,
        "clip_length": 0.5,
        "gumbel_eps": 0.3,
        "topk_window": 3,
        "pos_temperature": int(cfg.pos_temperature),
        "dropout": 0.1,
        "input_dropout": 0.5,
        "nms_thd": 0.5,
        "qddetr": True,
        "dabdetr": True,
        "gumbel": True,
        "gumbel_2": True,
        "gumbel_3": True,
        "gumbel_single_proj": True,
        "use_txt_pos": False,
        "pre_norm": False,
        "n_input_proj": 2,
        "lr": 1e-4,
        "lr_drop": [25],
        "seed": 2020,
        "results_dir": "results/mad",
        "device": None,
    }
    opt.update(changes)
    return argparse.Namespace(**opt)


def released_state(model: torch.nn.Module, cfg: ModelConfig, dv: int, dt: int, max_q: int, seed: int = 7) -> dict:
    """Our model's weights under the released names (the import map inverted); dropped tensors get random values."""
    g = torch.Generator().manual_seed(seed)
    ours = model.state_dict()
    state = {}
    for rule in released_layout(cfg, dv, dt, max_q):
        if rule.dropped:
            state[rule.released] = torch.randn(rule.shape, generator=g)
        else:
            third = rule.shape[0] // len(rule.targets)
            parts = [ours[t] if t else torch.randn(third, *rule.shape[1:], generator=g) for t in rule.targets]
            state[rule.released] = torch.cat(parts, dim=0).clone()
    return state


def save_released(path: Path, state: dict, opt: object, epoch: int = 34) -> Path:
    """The released file layout, with a real AdamW / MultiStepLR state (a Counter inside) as the released code saves."""
    lin = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(lin.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [25])
    lin(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    payload = {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "opt": opt,
    }
    torch.save(payload, path)
    return path


def make_batch(
    lengths: list[int], word_counts: list[int], lv: int = 9, lq: int = MAX_Q, seed: int = 0
) -> dict[str, torch.Tensor]:
    """B queries with their B positive windows, all B x B pairs; raw (un-normalised) token features."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    video_mask = torch.arange(lv)[None, :] < torch.tensor(lengths)[:, None]
    text_mask = torch.arange(lq)[None, :] < torch.tensor(word_counts)[:, None]
    pair_window, pair_text, positive = build_pairs(b, "in_batch", None)
    text = 3.0 * torch.randn(b, lq, DT, generator=g) * text_mask[..., None]  # zero padding, as the released collate
    return {
        "video": torch.randn(b, lv, DV, generator=g) * video_mask[..., None],
        "video_mask": video_mask,
        "text": text,
        "text_mask": text_mask,
        "pair_window": pair_window,
        "pair_text": pair_text,
        "positive_pair": positive,
    }


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every encoder output for all pairs (the model's own forward, which encodes every pair) and every decoder output
    for all pairs (the forward decodes only the positive ones), in eval mode."""
    model.eval()
    with torch.no_grad():
        enc = model(batch)["encoder"]
        dec = model.decode(enc)
    return [enc.memory, enc.context_logit, enc.frame_logit, enc.gate, enc.sampling_score, dec.logits, dec.spans_cw]


# 4 queries and their 4 windows, 16 pairs (query q, window w) at index 4q + w; with 4 heads, head h of pair (q, w)
# receives the padding pairs of pair 4w + h = (query w, window h) (head-major tiling, indices mod 16)
PADDED = ([9, 9, 9, 4], [MAX_Q, 2, MAX_Q, 5])  # window 3 padded; queries 1 and 3 have padded words
UNPADDED_WINDOWS = ([9, 9, 9, 9], [MAX_Q, 2, MAX_Q, 5])  # padded words only
UNPADDED_WORDS = ([9, 9, 9, 4], [MAX_Q] * 4)  # a padded window only


# ---------------------------------------------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------------------------------------------
def test_layout_at_the_mad_recipe_sizes_matches_the_released_count() -> None:
    """18,498,590 released parameters at the MAD sizes (the notes' count); 473,859 of them in dropped tensors and
    1,024 more in the dropped key thirds of the 4 encoder layers' stacked in-projection biases."""
    cfg = load_config("mad")
    rules = released_layout(cfg.model, 512, 512, 25)
    assert sum(math.prod(r.shape) for r in rules) == 18_498_590
    dropped = [r for r in rules if r.dropped]
    assert sum(math.prod(r.shape) for r in dropped) == 473_859
    partial = [r for r in rules if r.reason and not r.dropped]
    assert [r.targets[1] for r in partial] == [""] * 4 and all(r.released.endswith("in_proj_bias") for r in partial)
    assert sorted(r.released for r in dropped) == sorted(
        [
            f"transformer.decoder.layers.0.sa_{p}_proj.{w}"
            for p in ("qcontent", "qpos", "kcontent", "kpos")
            for w in ("weight", "bias")
        ]
        + [f"transformer.decoder.layers.{i}.sa_{p}_proj.bias" for i in range(1, 6) for p in ("kcontent", "kpos")]
        + [f"transformer.decoder.layers.{i}.ca_{p}_proj.bias" for i in range(6) for p in ("kcontent", "kpos")]
        + ["transformer.decoder.layers.0.sa_v_proj.weight", "saliency_proj1.bias"]
        + [f"saliency_proj.{w}" for w in ("weight", "bias")]
        + [f"txt_position_embed.{n}" for n in ("position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
        + [f"transformer.decoder.bbox_embed.5.layers.{j}.{w}" for j in range(3) for w in ("weight", "bias")]
    )
    # every mapped tensor lands on one of our tensors of the same shape (a third of it for stacked q/k/v), and every
    # tensor of ours is the target of exactly one
    ours = build_model(cfg.model, 512, 512).state_dict()
    targets = [(t, r) for r in rules for t in r.targets if t]
    assert sorted(t for t, _ in targets) == sorted(ours)
    for t, r in targets:
        assert tuple(ours[t].shape) == (r.shape[0] // len(r.targets), *r.shape[1:])
    assert sum(len(r.targets) == 3 for r in rules) == 2 * (2 + 2)  # weight + bias of 2 cross + 2 retrieval layers


@pytest.mark.parametrize("decoder_layers", [1, 3])
def test_round_trip_import_reproduces_the_model(tmp_path: Path, decoder_layers: int) -> None:
    cfg = small_cfg(decoder_layers=decoder_layers)
    seed_everything(0)
    original = build_model(cfg, DV, DT)
    path = save_released(
        tmp_path / "released.ckpt", released_state(original, cfg, DV, DT, MAX_Q), released_options(cfg)
    )
    result = import_released(path)  # the preset from dset_name="mad"
    assert result.preset == "mad" and result.released_epoch == 34
    c = result.config
    m = c.model
    assert (m.hidden_dim, m.num_heads, m.ffn_dim, m.cross_layers, m.retrieval_layers) == (32, 4, 48, 2, 2)
    assert (m.decoder_layers, m.num_queries, m.pos_temperature, m.sampler.temperature) == (decoder_layers, 4, 100, 0.3)
    assert (m.compat, m.mask_mode, m.encoder, m.retrieval, m.sampler.kind) == (
        "released",
        "additive",
        "rg",
        "context",
        "gumbel",
    )
    assert (m.dropout, m.input_dropout) == (0.1, 0.5)
    assert (c.data.video_dim, c.data.text_dim, c.data.max_query_tokens, c.data.normalize_text) == (DV, DT, MAX_Q, False)
    assert c.data.fps == 2.0 and c.windows.length_sec == 20.0 and c.windows.stride_sec == 0.0  # 40 frames of 0.5 s
    assert c.eval.top_k_windows == 3 and c.eval.nms_iou == 0.5 and c.data.layout == "mad"
    dropped = {r.released for r in result.dropped}
    assert ("transformer.decoder.query_scale.layers.0.weight" in dropped) == (decoder_layers == 1)

    imported = build_model(m, c.data.video_dim, c.data.text_dim)
    imported.load_state_dict(result.state_dict)
    for batch in (make_batch(*PADDED), make_batch(*UNPADDED_WINDOWS, seed=1)):
        for a, b in zip(outputs(original, batch), outputs(imported, batch), strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def released_file(tmp_path: Path) -> tuple[ModelConfig, dict, argparse.Namespace]:
    cfg = small_cfg()
    seed_everything(0)
    return cfg, released_state(build_model(cfg, DV, DT), cfg, DV, DT, MAX_Q), released_options(cfg)


def _import_error(tmp_path: Path, state: dict, opt: object, preset: str | None = None) -> str:
    path = save_released(tmp_path / "bad.ckpt", state, opt)
    with pytest.raises(ReleasedCheckpointError) as e:
        import_released(path, preset)
    return str(e.value)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path: Path, released_file) -> None:
    cfg, state, opt = released_file
    missing = dict(state)
    del missing["transformer.decoder.layers.1.ca_v_proj.weight"]
    msg = _import_error(tmp_path, missing, opt)
    assert "missing tensor 'transformer.decoder.layers.1.ca_v_proj.weight' (expected shape (32, 32))" in msg

    extra = {**state, "adapter.linear.weight": torch.zeros(4, 4)}
    msg = _import_error(tmp_path, extra, opt)
    assert "unexpected tensor 'adapter.linear.weight' of shape (4, 4)" in msg

    wrong = {**state, "class_embed.weight": torch.zeros(3, 32)}
    msg = _import_error(tmp_path, wrong, opt)
    assert "tensor 'class_embed.weight' has shape (3, 32), expected (2, 32)" in msg

    stacked = {**state, "transformer.t2v_encoder.layers.0.self_attn.in_proj_weight": torch.zeros(64, 32)}
    msg = _import_error(tmp_path, stacked, opt)
    assert "'transformer.t2v_encoder.layers.0.self_attn.in_proj_weight' has shape (64, 32), expected (96, 32)" in msg

    # options that disagree with the weights: the surplus decoder layer's tensors are named (the first 20 of 42)
    msg = _import_error(tmp_path, state, released_options(cfg, dec_layers=2))
    assert "(42 problem(s))" in msg and "... and 22 more" in msg
    assert "unexpected tensor 'transformer.decoder.layers.2.sa_qcontent_proj.weight' of shape (32, 32)" in msg


def test_options_are_checked(tmp_path: Path, released_file) -> None:
    cfg, state, opt = released_file
    no_window = argparse.Namespace(**{k: v for k, v in vars(opt).items() if k != "max_v_l"})
    assert "lack 'max_v_l'" in _import_error(tmp_path, state, no_window)
    assert "gumbel_2 is off" in _import_error(tmp_path, state, released_options(cfg, gumbel_2=False))
    assert "use_txt_pos is on" in _import_error(tmp_path, state, released_options(cfg, use_txt_pos=True))
    assert "nheads='8'" in _import_error(tmp_path, state, released_options(cfg, nheads="8"))
    unknown = released_options(cfg, dset_name="charades")
    assert "pass --preset mad or ego4d" in _import_error(tmp_path, state, unknown)
    result = import_released(save_released(tmp_path / "ok.ckpt", state, unknown), "ego4d")  # --preset decides
    assert result.preset == "ego4d" and result.config.data.layout == "ego4d"


def test_files_that_are_not_released_checkpoints(tmp_path: Path, released_file) -> None:
    _, state, opt = released_file
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ReleasedCheckpointError, match="is not a torch checkpoint file"):
        import_released(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_released(tmp_path / "absent.ckpt")
    # a state dict alone (no opt)
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(ReleasedCheckpointError, match="not a released RGNet checkpoint: that is a dict with keys"):
        import_released(tmp_path / "bare.pth")
    # a checkpoint of this project
    seed_everything(0)
    project = load_config("tiny")
    model = build_model(project.model, project.data.video_dim, project.data.text_dim)
    own = ckpt.save_checkpoint(ckpt.make_payload(model, project, epoch=1, global_step=1), tmp_path / "own.pt")
    with pytest.raises(ReleasedCheckpointError, match="is a checkpoint of this project"):
        import_released(own)
    # anything but tensors, plain containers and argparse.Namespace is refused, not unpickled
    torch.save({"model": state, "opt": opt, "extra": fractions.Fraction(1, 3)}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ReleasedCheckpointError, match="holds a fractions.Fraction object"):
        import_released(tmp_path / "unsafe.ckpt")


# ---------------------------------------------------------------------------------------------------------------
# model.compat=released
# ---------------------------------------------------------------------------------------------------------------
def reference_mask(frame_valid: torch.Tensor, word_valid: torch.Tensor, heads: int) -> torch.Tensor:
    """The notes' description, element by element: head h of sample b may attend word j from frame i iff word j of
    sample b is valid and not (frame i and word j of sample (b * H + h) mod N are both padding)."""
    n, lv = frame_valid.shape
    lq = word_valid.shape[1]
    allowed = torch.zeros(n, heads, lv, lq, dtype=torch.bool)
    for b in range(n):
        for h in range(heads):
            s = (b * heads + h) % n
            for i in range(lv):
                for j in range(lq):
                    both_padding = not frame_valid[s, i] and not word_valid[s, j]
                    allowed[b, h, i, j] = bool(word_valid[b, j]) and not both_padding
    return allowed


def test_head_major_tiling_matches_the_reference_loop_and_pytorch_mha() -> None:
    torch.manual_seed(0)
    heads, lv, lq, d = 4, 5, 4, 16
    frame_valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    word_valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    mask = released_cross_attention_mask(frame_valid, word_valid, heads)
    assert mask is not None
    assert torch.equal(mask, reference_mask(frame_valid, word_valid, heads))
    # sample 0 has no padding, yet its head 1 receives sample 1's padding pairs (0 * 4 + 1 = 1)
    assert not mask[0, 1, 3, 2] and mask[0, 0, 3, 2] and bool(word_valid[0, 2])
    # no padded frame anywhere, or no padded word anywhere: the clean key-padding mask is exact (None)
    assert released_cross_attention_mask(torch.ones_like(frame_valid), word_valid, heads) is None
    assert released_cross_attention_mask(frame_valid, torch.ones_like(word_valid), heads) is None

    # the released layer itself: nn.MultiheadAttention given the per-sample mask tiled with repeat(nhead, 1, 1) and
    # the key padding mask, then QD-DETR's residual order, equals our cross-attention layer with this mask
    layer = CrossAttentionLayer(d, heads, 32, 0.0, 0.0).eval()
    frames, pos, words = torch.randn(3, lv, d), torch.randn(3, lv, d), torch.randn(3, lq, d)
    mha = torch.nn.MultiheadAttention(d, heads).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
        key_bias = torch.randn(d)  # any key bias: the softmax cancels it (our key projection has none)
        mha.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, key_bias, layer.v_proj.bias]))
        mha.out_proj.load_state_dict(layer.out_proj.state_dict())
        pad_pair = (~frame_valid[:, :, None]).float() @ (~word_valid[:, None, :]).float()  # (N, Lv, Lq)
        tiled = pad_pair.bool().repeat(heads, 1, 1)  # head-major, as released
        attn, _ = mha(
            (frames + pos).transpose(0, 1),
            words.transpose(0, 1),
            words.transpose(0, 1),
            attn_mask=tiled,
            key_padding_mask=~word_valid,
        )
        u = frames + attn.transpose(0, 1)
        released = layer.norm2(u + layer.ffn(layer.norm1(u)))
        keys, values = layer.project_text(words)
        ours = layer(frames, pos, keys, values, mask)
        clean = layer(frames, pos, keys, values, word_valid[:, None, None, :])
    torch.testing.assert_close(ours, released, rtol=1e-5, atol=1e-5)
    assert (clean - released).abs().amax() > 1e-2  # the tiling matters on this batch


def _clean_and_released(decoder_layers: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = small_cfg(decoder_layers=decoder_layers)
    seed_everything(0)
    released = build_model(cfg, DV, DT)
    clean = build_model(replace(cfg, compat="clean"), DV, DT)
    clean.load_state_dict(released.state_dict())
    return clean, released


def _for_clean(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The clean model reads normalised tokens: give it exactly what the released model computes from raw ones."""
    return {**batch, "text": released_token_norm(batch["text"])}


def test_released_equals_clean_without_padded_windows_and_differs_with_them() -> None:
    clean, released = _clean_and_released()
    for lengths, words in (UNPADDED_WINDOWS, UNPADDED_WORDS):
        batch = make_batch(lengths, words)
        for a, b in zip(outputs(clean, _for_clean(batch)), outputs(released, batch), strict=True):
            assert torch.equal(a, b)
    batch = make_batch(*PADDED)
    a, b = outputs(clean, _for_clean(batch)), outputs(released, batch)
    # padding pairs exist in (query 1, window 3) and (query 3, window 3): head 3 of every pair (q, window 1) reads
    # them (4 * 1 + 3 = 7 = query 1, window 3; 13 = query 3, window 3 is read by the pairs (q, 3), whose own rows
    # there are padding).  Pairs (0, 1), (2, 1), (3, 1) (indices 1, 9, 13) then lose words their query does have
    # on valid frames 4-8; pair (1, 1) loses only words it lacks anyway; no other pair reads a padding pair.
    changed = [1, 9, 13]
    same = [n for n in range(16) if n not in changed]
    assert ((a[1] - b[1]).abs()[changed] > 1e-4).all()  # the context scores of exactly these pairs move
    torch.testing.assert_close(a[1][same], b[1][same], rtol=1e-6, atol=1e-6)
    valid = batch["video_mask"][batch["pair_window"]]  # (N, Lv)
    moved = ((a[0] - b[0]).abs().amax(dim=-1) * valid).amax(dim=1) > 1e-4  # encoded proposals on valid frames
    assert moved.nonzero().flatten().tolist() == changed


def test_released_token_norm_and_config_checks() -> None:
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [3e-6, 4e-6]]])
    expected = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [3e-6, 4e-6]]]) / torch.tensor([5.0, 1e-5, 1.5e-5])[:, None]
    torch.testing.assert_close(released_token_norm(x), expected)
    assert released_token_norm(x)[0, 2].norm() == pytest.approx(1 / 3)  # x / max(||x||, eps) would give 1
    with pytest.raises(ConfigError, match="model.mask_mode=additive"):
        load_config("tiny", overrides=["model.compat=released", "data.normalize_text=false"])
    with pytest.raises(ConfigError, match="data.normalize_text=false"):
        load_config("tiny", overrides=["model.compat=released", "model.mask_mode=additive"])
    cfg = load_config(
        "tiny", overrides=["model.compat=released", "model.mask_mode=additive", "data.normalize_text=false"]
    )  # any order
    assert cfg.model.compat == "released"


def test_released_decoder_does_not_clamp_the_anchor_width() -> None:
    clean, released = _clean_and_released()
    batch = make_batch(*UNPADDED_WINDOWS)
    for a, b in zip(outputs(clean, _for_clean(batch)), outputs(released, batch), strict=True):
        assert torch.equal(a, b)  # widths above 1e-3: the clamp does nothing
    with torch.no_grad():
        for model in (clean, released):
            model.decoder.anchors.weight[:, 1] = -12.0  # sigmoid: width 6e-6 < 1e-3
    a, b = outputs(clean, _for_clean(batch)), outputs(released, batch)
    assert torch.equal(a[0], b[0])  # the encoder is untouched
    assert not torch.allclose(a[-1], b[-1])  # the decoder's spans differ


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning: train.init_from
# ---------------------------------------------------------------------------------------------------------------
def tiny(tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        "tiny",
        overrides=[f"data.root={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'runs'}", "train.progress=false",
                   *overrides],
    )  # fmt: skip


def test_init_weights_from_loads_weights_and_checks_shapes(tmp_path: Path) -> None:
    cfg = tiny(tmp_path)

    def init(model: torch.nn.Module, c: Config) -> bool:  # the two sections it reads
        return ckpt.init_weights_from(model, c.train, c.model)

    seed_everything(1)
    source = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    path = ckpt.save_checkpoint(ckpt.make_payload(source, cfg, epoch=3, global_step=9), tmp_path / "a.pt")
    seed_everything(2)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    assert not init(model, cfg)  # empty key: nothing happens
    assert init(model, from_dict({"train": {"init_from": str(path)}}, cfg))
    for (k, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # a model of another shape: every mismatching tensor is named, with both shapes
    more = from_dict({"model": {"num_queries": 4}, "train": {"init_from": str(path)}}, cfg)
    with pytest.raises(ConfigError, match=r"\(1 problem\(s\)\):\n  tensor 'decoder.anchors.weight' has shape \(3, 2\), "
                       r"the model expects \(4, 2\)$"):  # fmt: skip
        init(build_model(more.model, 32, 48), more)
    deeper = from_dict({"model": {"decoder_layers": 3}, "train": {"init_from": str(path)}}, cfg)
    with pytest.raises(
        ConfigError, match=r"missing tensor 'decoder.layers.2.sa_q_content.weight' \(shape \(32, 32\)\)"
    ):
        init(build_model(deeper.model, 32, 48), deeper)
    with pytest.raises(FileNotFoundError, match="absolute path"):
        init(model, from_dict({"train": {"init_from": str(tmp_path / "nope.pt")}}, cfg))
    # a released file must be imported first
    rcfg = small_cfg()
    released = save_released(
        tmp_path / "r.ckpt", released_state(build_model(rcfg, DV, DT), rcfg, DV, DT, MAX_Q), released_options(rcfg)
    )
    with pytest.raises(ConfigError, match="rgnet import released"):
        init(model, from_dict({"train": {"init_from": str(released)}}, cfg))


def test_run_local_starts_from_init_from_with_a_fresh_optimizer_and_resume_wins(tmp_path: Path) -> None:
    """optim.lr=0 leaves AdamW's weights unchanged, so the trained weights are the initial ones."""
    base = tiny(tmp_path, "optim.lr=0.0", "train.epochs=1", "train.max_steps_per_epoch=2")
    ensure_dataset(base.data)
    sources = []
    for seed in (11, 12):
        seed_everything(seed)
        model = build_model(base.model, base.data.video_dim, base.data.text_dim)
        sources.append(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # a used optimizer in the source: must not carry over
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for _ in range(5):
            opt.step()
        payload = ckpt.make_payload(model, base, epoch=7, global_step=70, optimizer=opt)
        ckpt.save_checkpoint(payload, tmp_path / f"init{seed}.pt")
    cfg = from_dict({"train": {"init_from": str(tmp_path / "init11.pt")}}, base)
    train_local(cfg, test=False)
    last = ckpt.load_checkpoint(tmp_path / "runs" / cfg.train.run_name / "last.pt")
    assert last["epoch"] == 1 and last["global_step"] == 2  # counted from zero, not from the source's 7 / 70
    steps = {int(s["step"]) for s in last["optimizer"]["state"].values()}
    assert steps == {2}  # a fresh AdamW that took this run's two steps
    for k, v in sources[0].items():
        assert torch.equal(last["model"][k], v), k
    # the run resumes from its own last.pt: another init_from is ignored (resume wins)
    again = from_dict({"train": {"init_from": str(tmp_path / "init12.pt"), "epochs": 2}}, base)
    train_local(again, test=False)
    last = ckpt.load_checkpoint(tmp_path / "runs" / cfg.train.run_name / "last.pt")
    assert last["epoch"] == 2
    for k, v in sources[0].items():
        assert torch.equal(last["model"][k], v), k


def test_init_from_key_and_search_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.runtime import resolve_paths

    monkeypatch.chdir(tmp_path)
    args = train_cli.build_parser().parse_args(["--local", "--preset", "tiny", "train.init_from=w/a b: c.pt"])
    cfg = train_cli.config_from_args(args)
    assert cfg.train.init_from == "w/a b: c.pt"  # the text as given (a path is not YAML), relative for --local
    assert resolve_paths(cfg).train.init_from == str(tmp_path / "w" / "a b: c.pt")  # absolute for Ray's workers
    fixed = tmp_path / "finetune.yaml"  # every trial fine-tunes the same weights
    fixed.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "fixed": {"train.init_from": "/ckpt/released-mad/checkpoint.pt", "train.epochs": 2},
                "space": {"optim.lr": {"loguniform": [1e-6, 1e-4]}},
            }
        )
    )
    assert load_space(fixed).base_config().train.init_from == "/ckpt/released-mad/checkpoint.pt"
    searched = tmp_path / "starts.yaml"  # or the starting weights are searched
    searched.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "space": {"train.init_from": {"grid": ["/ckpt/a/checkpoint.pt", "/ckpt/b/checkpoint.pt"]}},
            }
        )
    )
    space = load_space(searched)
    assert space.params["train.init_from"].values == ("/ckpt/a/checkpoint.pt", "/ckpt/b/checkpoint.pt")
    cfg = apply_overrides(space.base_config(), trial_overrides(space, {"train.init_from": "/ckpt/b/checkpoint.pt"}))
    assert cfg.train.init_from == "/ckpt/b/checkpoint.pt"


# ---------------------------------------------------------------------------------------------------------------
# The command line, end to end on the tiny data
# ---------------------------------------------------------------------------------------------------------------
def test_cli_import_then_evaluate_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny(tmp_path)
    ensure_dataset(data.data)
    # a released-format file of a model at the tiny data's widths (32-d video, 48-d text, at most 12 tokens)
    mcfg = small_cfg(hidden_dim=16, num_heads=2, ffn_dim=32, cross_layers=1, retrieval_layers=1, decoder_layers=2)
    seed_everything(5)
    original = build_model(mcfg, 32, 48)
    opt = released_options(mcfg, dset_name="ego4d_nlq", max_q_l=12, topk_window=3, clip_length=0.5, max_v_l=40)
    path = save_released(tmp_path / "rgnet_ego4d.ckpt", released_state(original, mcfg, 32, 48, 12), opt, epoch=99)
    out = tmp_path / "imported"
    assert cli.main(["import", "released", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "with preset ego4d" in printed and "split in three" in printed
    assert "transformer.decoder.bbox_embed.1.layers.0.weight" in printed  # the dropped last refinement
    assert "rgnet train --config" in printed and "train.init_from=" in printed
    payload = ckpt.load_checkpoint(out / "checkpoint.pt")  # weights_only=True
    assert payload["imported_from"]["released_epoch"] == 99 and payload["optimizer"] is None
    assert yaml.safe_load((out / "config.yaml").read_text()) == payload["config"]
    model, cfg = ckpt.model_from_payload(payload)
    assert cfg.model.compat == "released" and cfg.windows.length_sec == 20.0
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    # rgnet evaluate --checkpoint on the tiny data = the original weights evaluated with the same config
    over = ["data.layout=native", f"data.root={data.data.root}", "train.progress=false"]
    report = tmp_path / "report.json"
    argv = ["--checkpoint", str(out / "checkpoint.pt"), "--split", "val", *over, "--out", str(report)]
    assert evaluate_cli.main(argv) == 0
    eval_cfg = from_dict({"data": {"layout": "native", "root": data.data.root}}, cfg)
    expected, _ = evaluate_model(
        original.eval(), open_split(eval_cfg.data, "val"), eval_cfg.windows, eval_cfg.eval, torch.device("cpu")
    )
    assert json.loads(report.read_text())["metrics"] == expected["metrics"]

    # rgnet predict --checkpoint, one query: the released model reads raw tokens and normalises them itself
    features = Path(data.data.root) / "features.h5"
    with h5py.File(features, "r") as f:
        frames = np.asarray(f["videos/syn-v0016"], dtype=np.float32)
        tokens = np.asarray(f["queries/syn-a0016_0"], dtype=np.float32)
    answer_file = tmp_path / "answer.json"
    argv = ["--checkpoint", str(out / "checkpoint.pt"), "--video", f"{features}:videos/syn-v0016"]
    argv += ["--query-features", f"{features}:queries/syn-a0016_0", "--top", "5", "--json", str(answer_file)]
    assert predict_cli.main(argv) == 0
    answer = json.loads(answer_file.read_text())
    direct = ground(original.eval(), cfg, frames, 2.0, tokens, top_n=5)
    moments = [[m["start_sec"], m["end_sec"], m["score"]] for m in answer["moments"]]
    assert len(moments) == 5
    np.testing.assert_allclose(np.array(moments), np.array(direct.moments), atol=1e-6)
