"""RGNet model: shapes for every component choice, gradients, the sampler, retrieval masks, determinism."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_model_config

from rgnet.config import LossConfig, ModelConfig, SamplerConfig
from rgnet.model import Criterion, build_model, build_pairs
from rgnet.model.encoder import RGEncoder
from rgnet.model.layers import Dropout, FeedForward, SelfAttentionLayer, _drop_mask, attend
from rgnet.model.retrieval import frozen_context_logit, hard_mask_parts, retrieval_attention_mask
from rgnet.model.sampler import GumbelSampler, straight_through_gate

Negatives = Literal["in_batch", "same_video", "both"]
DV, DT = 12, 10  # raw feature widths (deliberately different from D and from each other)


def tiny_cfg(**kw: object) -> ModelConfig:
    return small_model_config(
        **{"num_heads": 2, "cross_layers": 1, "input_dropout": 0.1, "attention_dropout": 0.1, **kw}
    )


def make_batch(b: int = 3, lv: int = 9, negatives: str = "in_batch", seed: int = 0) -> dict[str, torch.Tensor]:
    """B queries, B positive windows (the last one padded to a short valid length) plus same-video negatives."""
    g = torch.Generator().manual_seed(seed)
    neg_window = torch.full((b,), -1, dtype=torch.long)
    num_windows = b
    if negatives in ("same_video", "both"):
        neg_window[: b - 1] = torch.arange(b, 2 * b - 1)  # the last query has no negative window
        num_windows = 2 * b - 1
    lengths = torch.full((num_windows,), lv)
    lengths[b - 1] = 3  # a short, padded positive window
    lengths[-1] = lv - 2
    video_mask = torch.arange(lv)[None, :] < lengths[:, None]
    lq = 5
    text_mask = torch.arange(lq)[None, :] < torch.tensor([lq, 2, 4])[:b, None]
    pair_window, pair_text, positive_pair = build_pairs(b, negatives, neg_window)
    return {
        "video": torch.randn(num_windows, lv, DV, generator=g),
        "video_mask": video_mask,
        "text": F.normalize(torch.randn(b, lq, DT, generator=g), dim=-1),
        "text_mask": text_mask,
        "sentence": torch.randn(b, DV, generator=g),
        "pair_window": pair_window,
        "pair_text": pair_text,
        "positive_pair": positive_pair,
        "neg_window": neg_window,
        "span_cw": torch.tensor([[0.5, 0.3], [0.2, 0.2], [0.6, 0.5]])[:b],
        "in_frame": torch.tensor([4, 1, 1])[:b],
        "out_frame": torch.tensor([0, 7, 2])[:b],
    }


# every meaningful combination: the plain encoder has no sampler and no gated mask; without a sampler the gate is
# all ones, so the mask modes coincide
VARIANTS = [
    dict(encoder="rg", sampler="gumbel", mask_mode="hard", retrieval="context"),
    dict(encoder="rg", sampler="gumbel", mask_mode="additive", retrieval="context"),
    dict(encoder="rg", sampler="gumbel", mask_mode="none", retrieval="context"),
    dict(encoder="rg", sampler="gumbel", mask_mode="hard", retrieval="none"),
    dict(encoder="rg", sampler="gumbel", mask_mode="additive", retrieval="none"),
    dict(encoder="rg", sampler="none", mask_mode="hard", retrieval="context"),
    dict(encoder="rg", sampler="none", mask_mode="hard", retrieval="none"),  # the disjoint baseline
    dict(encoder="plain", sampler="gumbel", mask_mode="hard", retrieval="context"),
    dict(encoder="plain", sampler="none", mask_mode="hard", retrieval="none"),
]


def variant_cfg(v: dict[str, str], **kw: object) -> ModelConfig:
    return tiny_cfg(
        encoder=v["encoder"],
        sampler=SamplerConfig(kind=v["sampler"]),  # type: ignore[arg-type]
        mask_mode=v["mask_mode"],
        retrieval=v["retrieval"],
        **kw,
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
@pytest.mark.parametrize(("layers", "queries"), [(2, 3), (4, 7)])
def test_output_shapes(variant: dict[str, str], layers: int, queries: int) -> None:
    torch.manual_seed(0)
    cfg = variant_cfg(variant, decoder_layers=layers, num_queries=queries)
    model = build_model(cfg, DV, DT)
    batch = make_batch()
    out = model(batch)
    enc, dec = out["encoder"], out["decoder"]
    n, lv, d, b = batch["pair_window"].numel(), batch["video"].shape[1], cfg.hidden_dim, 3
    assert enc.memory.shape == (n, lv, d) and enc.pos.shape == (n, lv, d)
    assert enc.memory_mask.shape == (n, lv) and enc.memory_mask.dtype == torch.bool
    assert enc.context_logit.shape == (n,)
    for t in (enc.frame_logit, enc.gate, enc.sampling_score):
        assert t.shape == (n, lv)
    assert torch.equal(enc.memory_mask, batch["video_mask"][batch["pair_window"]])
    assert set(enc.gate.detach().unique().tolist()) <= {0.0, 1.0}
    if variant["sampler"] == "none" or variant["encoder"] == "plain":
        assert torch.equal(enc.gate, torch.ones(n, lv))
    assert dec.logits.shape == (layers, b, queries, 2) and dec.spans_cw.shape == (layers, b, queries, 2)
    assert ((dec.spans_cw >= 0) & (dec.spans_cw <= 1)).all()
    assert bool(out["learned_context"]) == (variant["retrieval"] == "context")


def _named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_every_parameter_gets_a_gradient(variant: dict[str, str]) -> None:
    torch.manual_seed(1)
    model = build_model(variant_cfg(variant), DV, DT).train()
    criterion = Criterion(LossConfig(negatives="both"))
    batch = make_batch(negatives="both")
    losses = criterion(model(batch), batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_sampling"] > 0 and losses["loss_fg"] > 0
    assert (losses["loss_contrastive"] > 0) == (variant["retrieval"] == "context")
    losses["loss"].backward()
    # 1e-6, not 0: a parameter whose true gradient is 0 (e.g. an attention key bias, which the softmax cancels) still
    # gets rounding noise of ~1e-9; every real gradient here is above 1e-4
    missing = [name for name, g in _named_grads(model).items() if g is None or not g.abs().max() > 1e-6]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(g).all() for g in _named_grads(model).values() if g is not None)


@pytest.mark.parametrize("mask_mode", ["hard", "additive"])
@pytest.mark.parametrize("negatives", ["in_batch", "same_video"])
def test_fully_irrelevant_gate_is_finite(mask_mode: str, negatives: Negatives) -> None:
    torch.manual_seed(2)
    model = build_model(tiny_cfg(mask_mode=mask_mode), DV, DT).train()
    assert isinstance(model.encoder, RGEncoder) and model.encoder.sampler is not None
    with torch.no_grad():
        model.encoder.sampler.relevance.bias.fill_(-100.0)  # beyond any logistic noise: every gate is 0
    batch = make_batch(negatives=negatives)
    out = model(batch)
    assert torch.equal(out["encoder"].gate, torch.zeros_like(out["encoder"].gate))
    losses = Criterion(LossConfig(negatives=negatives))(out, batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(torch.isfinite(g).all() for g in _named_grads(model).values() if g is not None)


def test_gumbel_sampler_straight_through() -> None:
    torch.manual_seed(3)
    sampler = GumbelSampler(8, temperature=0.3).train()
    frames = torch.randn(4, 6, 8)
    _, gate = sampler(frames)
    assert set(gate.unique().tolist()) <= {0.0, 1.0}
    assert 0 < gate.sum() < gate.numel()  # both values occur with random frames and noise

    noise = torch.logit(torch.rand(4, 6))  # the same logistic noise for both paths
    weights = torch.randn(4, 6)
    logit, gate = sampler(frames, noise=noise)
    assert torch.equal(gate.detach(), (torch.sigmoid((logit + noise) / 0.3) >= 0.5).float())
    (grad_st,) = torch.autograd.grad((gate * weights).sum(), sampler.relevance.weight)
    logit_ref = sampler.relevance(frames).squeeze(-1)
    soft = torch.sigmoid((logit_ref + noise) / 0.3)
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), sampler.relevance.weight)
    torch.testing.assert_close(grad_st, grad_soft)

    sampler.eval()
    logit_a, gate_a = sampler(frames)
    _, gate_b = sampler(frames)
    assert torch.equal(gate_a, gate_b) and torch.equal(gate_a, (logit_a >= 0).float())


def test_straight_through_gate_values() -> None:
    logit = torch.tensor([-1.0, 0.2, 3.0], requires_grad=True)
    gate = straight_through_gate(logit, 0.5, torch.tensor([0.5, -0.3, -4.0]))
    assert gate.tolist() == [0.0, 0.0, 0.0]  # (z + l) = -0.5, -0.1, -1.0: all below 0
    gate.sum().backward()
    s = torch.sigmoid(torch.tensor([-0.5, -0.1, -1.0]) / 0.5)
    torch.testing.assert_close(logit.grad, s * (1 - s) / 0.5)


def test_hard_mask_isolates_irrelevant_frames() -> None:
    torch.manual_seed(4)
    layer = SelfAttentionLayer(16, 2, 24, dropout=0.0, attention_dropout=0.0).eval()
    n, lv = 1, 6
    gate = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    mask = retrieval_attention_mask(gate, valid, "hard")
    x = torch.randn(n, 1 + lv, 16)  # [token; frames]
    pos = torch.randn(n, 1 + lv, 16)
    base = layer(x, pos, mask)
    bumped = x.clone()
    bumped[:, 1 + 2] += 5.0  # perturb frame 2 (relevant)
    out = layer(bumped, pos, mask)
    irrelevant_rows = [1 + 1, 1 + 3]
    torch.testing.assert_close(out[:, irrelevant_rows], base[:, irrelevant_rows])
    assert not torch.allclose(out[:, 1 + 0], base[:, 1 + 0])  # a relevant frame sees the change
    assert not torch.allclose(out[:, 0], base[:, 0])  # so does the retrieval token
    bumped = x.clone()
    bumped[:, 1 + 5] += 5.0  # a padded frame changes nothing for valid rows
    torch.testing.assert_close(layer(bumped, pos, mask)[:, :6], base[:, :6])


def test_factored_hard_mask_equals_full_mask() -> None:
    """The fused path (key-padding mask + self-only rows) gives the full (N, L, L) hard mask's outputs and grads."""
    torch.manual_seed(6)
    layer = SelfAttentionLayer(16, 2, 24, dropout=0.0, attention_dropout=0.0).train()
    n, lv = 3, 7
    gate = (torch.rand(n, lv) > 0.5).float()
    gate[0] = 0.0  # a pair whose every frame is irrelevant
    valid = torch.ones(n, lv, dtype=torch.bool)
    valid[1, 5:] = False  # padding in one pair
    x = torch.randn(n, 1 + lv, 16, requires_grad=True)
    pos = torch.randn(n, 1 + lv, 16)
    # rows that matter: the token and the valid frames (a padded row's output feeds nothing: it is a masked key
    # everywhere downstream; the full mask lets it read its own padded key, the factored one does not)
    rows = torch.cat([torch.ones(n, 1, dtype=torch.bool), valid], dim=1)
    full = layer(x, pos, retrieval_attention_mask(gate, valid, "hard"))[rows]
    (gx_full,) = torch.autograd.grad(full.square().sum(), x)
    key_mask, self_only = hard_mask_parts(gate, valid)
    assert key_mask is not None and key_mask.shape == (n, 1, 1, 1 + lv)
    fused = layer(x, pos, key_mask, self_only)[rows]
    (gx_fused,) = torch.autograd.grad(fused.square().sum(), x)
    torch.testing.assert_close(fused, full)
    torch.testing.assert_close(gx_fused[rows], gx_full[rows])
    # without padding the key mask is dropped altogether (None = the unmasked fused kernel)
    assert hard_mask_parts(gate, torch.ones(n, lv, dtype=torch.bool))[0] is None


def test_additive_mask_matches_hand_computation() -> None:
    torch.manual_seed(5)
    gate = torch.tensor([[0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False]])
    mask = retrieval_attention_mask(gate, valid, "additive")  # (1, 1, 4, 4) over [token; 3 frames]
    inf = float("-inf")
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0, inf],  # token row: unrestricted
            [1.0, 0.0, 1.0, inf],  # frame 0 irrelevant: +1 on every non-self key
            [0.0, 0.0, 0.0, inf],  # frame 1 relevant
            [1.0, 1.0, 1.0, inf],  # frame 2 irrelevant and padded: its self key is padding
        ]
    )
    assert torch.equal(mask[0, 0], expected)
    q, k, v = torch.randn(3, 1, 1, 4, 8).unbind(0)  # one sample, one head
    # rows 0-2 by hand: softmax(q k^T / sqrt(d) + M) v
    logits = q[0, 0] @ k[0, 0].T / math.sqrt(8) + expected
    ref = torch.softmax(logits, dim=-1) @ v[0, 0]
    torch.testing.assert_close(attend(q, k, v, mask, 0.0)[0, 0], ref)


def test_mask_none_is_padding_only() -> None:
    mask = retrieval_attention_mask(torch.zeros(1, 3), torch.tensor([[True, True, False]]), "none")
    assert mask.shape == (1, 1, 1, 4) and mask[0, 0, 0].tolist() == [True, True, True, False]


def test_eval_encode_is_deterministic_and_decode_select_matches() -> None:
    torch.manual_seed(6)
    model = build_model(tiny_cfg(), DV, DT).eval()
    batch = make_batch()
    # the same window encoded twice against the same query (pairs 0 and 1) must agree exactly
    window_index = torch.tensor([0, 0, 1, 2])
    text_index = torch.tensor([1, 1, 0, 2])
    with torch.no_grad():
        enc = model.encode(
            batch["video"], batch["video_mask"], batch["text"], batch["text_mask"], window_index, text_index
        )
        for field in enc:
            torch.testing.assert_close(field[0], field[1], rtol=0, atol=0)
        enc_again = model.encode(
            batch["video"], batch["video_mask"], batch["text"], batch["text_mask"], window_index, text_index
        )
        for a, b in zip(enc, enc_again):
            assert torch.equal(a, b)
        full = model.decode(enc)
        select = torch.tensor([3, 0])
        part = model.decode(enc, select)
    torch.testing.assert_close(part.logits, full.logits[:, select])
    torch.testing.assert_close(part.spans_cw, full.spans_cw[:, select])


def test_build_pairs_layouts() -> None:
    pw, pt, pp = build_pairs(3, "in_batch", None)
    assert pt.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and pw.tolist() == [0, 1, 2] * 3
    assert pp.tolist() == [0, 4, 8] and all(pw[pp[q]] == q and pt[pp[q]] == q for q in range(3))
    neg = torch.tensor([3, -1, 4])
    pw, pt, pp = build_pairs(3, "same_video", neg)
    assert list(zip(pt.tolist(), pw.tolist())) == [(0, 0), (1, 1), (2, 2), (0, 3), (2, 4)]
    assert pp.tolist() == [0, 1, 2]
    pw, pt, pp = build_pairs(3, "both", neg)
    assert pw.numel() == 11 and list(zip(pt[9:].tolist(), pw[9:].tolist())) == [(0, 3), (2, 4)]
    assert pp.tolist() == [0, 4, 8]
    with pytest.raises(ValueError, match="in_batch, same_video, both"):
        build_pairs(3, "everything", None)


def test_frozen_ranking_needs_sentences_and_is_max_cosine() -> None:
    torch.manual_seed(7)
    model = build_model(tiny_cfg(retrieval="none", sampler=SamplerConfig(kind="none")), DV, DT).eval()
    assert model.context_head is None
    batch = make_batch()
    args = (batch["video"], batch["video_mask"], batch["text"], batch["text_mask"], batch["pair_window"])
    with pytest.raises(ValueError, match="sentence features"):
        model.encode(*args, batch["pair_text"])
    logit = frozen_context_logit(
        batch["video"], batch["video_mask"], batch["sentence"], batch["pair_window"], batch["pair_text"]
    )
    for n, (w, q) in enumerate(zip(batch["pair_window"].tolist(), batch["pair_text"].tolist())):
        valid = batch["video"][w][batch["video_mask"][w]]
        expected = F.cosine_similarity(valid, batch["sentence"][q][None], dim=-1).max()
        torch.testing.assert_close(logit[n], expected)
    with pytest.raises(ValueError, match="video tower"):
        frozen_context_logit(
            batch["video"], batch["video_mask"], torch.randn(3, DV + 1), batch["pair_window"], batch["pair_text"]
        )


def test_fast_dropout_rate_scale_and_gradient() -> None:
    torch.manual_seed(8)
    drop = Dropout(0.25).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, y.detach())
    assert drop.eval()(x) is x

    # the fused ReLU-dropout of the FFN equals ReLU then the same mask, in value and gradient
    ffn = FeedForward(6, 16, dropout=0.3).train()
    inputs = torch.randn(5, 7, 6, requires_grad=True)
    torch.manual_seed(10)
    out = ffn(inputs)
    torch.manual_seed(10)  # the same draw: linear1 uses no randomness, then the mask
    raw = ffn.linear1(inputs.reshape(-1, 6))
    mask, scale = _drop_mask(raw.shape, 0.3, raw.device)
    ref = ffn.linear2(F.relu(raw).masked_fill(mask, 0.0) * scale).view(5, 7, 6)
    torch.testing.assert_close(out, ref)
    (grad_fused,) = torch.autograd.grad(out.square().sum(), inputs)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(grad_fused, grad_ref)


def test_keyed_draws_do_not_depend_on_the_batch() -> None:
    """With stream keys, a pair's dropout masks and Gumbel noise are a function of its keys: the same pairs computed
    in a different batch (fewer queries, other order) get the same encoder outputs, while other keys change them."""
    from rgnet.data.samples import assemble_step, collate_shard

    torch.manual_seed(0)
    cfg = variant_cfg({"encoder": "rg", "sampler": "gumbel", "mask_mode": "hard", "retrieval": "context"})
    cfg = replace(cfg, dropout=0.3, input_dropout=0.3, attention_dropout=0.2)
    model = build_model(cfg, DV, DT).train()
    gen = torch.Generator().manual_seed(5)
    items = [
        {
            "video": torch.randn(7, DV, generator=gen).numpy(),
            "video_len": np.int64(7 - i % 2),
            "text": torch.randn(3 + i, DT, generator=gen).numpy(),
            "span_cw": np.array([0.5, 0.2], dtype=np.float32),
            "in_frame": np.int64(3),
            "out_frame": np.int64(0),
            "window_key": np.int64(100 + i),
            "text_key": np.int64(200 + i),
        }
        for i in range(4)
    ]
    whole = assemble_step(collate_shard(items, text_length=6), "in_batch")
    part = assemble_step(collate_shard(items[2:], text_length=6), "in_batch")  # queries 2, 3 with windows 2, 3
    torch.manual_seed(1)  # the global generator must not matter
    a = model(whole)["encoder"]
    torch.manual_seed(2)
    b = model(part)["encoder"]
    # whole pair (q, w) = q * 4 + w; part pair (q', w') = q' * 2 + w' for q = q' + 2, w = w' + 2
    same = torch.tensor([2 * 4 + 2, 2 * 4 + 3, 3 * 4 + 2, 3 * 4 + 3])
    torch.testing.assert_close(b.context_logit, a.context_logit[same], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.gate, a.gate[same])
    torch.testing.assert_close(b.memory, a.memory[same], rtol=1e-5, atol=1e-5)
    rekeyed = [{**it, "text_key": np.int64(900 + i)} for i, it in enumerate(items)]
    c = model(assemble_step(collate_shard(rekeyed, text_length=6), "in_batch"))["encoder"]
    assert not torch.allclose(c.memory, a.memory)
