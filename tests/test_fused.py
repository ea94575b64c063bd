"""The fused inference copy (eval.kernels=fused, rgnet.model.fused) computes the eager model's function: context
scores and moments within 1e-4, for every encoder, mask and retrieval variant."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from rgnet.config import Config, load_config
from rgnet.data.records import QueryRecord
from rgnet.data.samples import VideoItem, WindowSpec
from rgnet.data.windows import window_bounds
from rgnet.eval.inference import infer_video
from rgnet.model import build_model
from rgnet.model.fused import FusedFeedForward, FusedLinear, fuse_for_inference
from rgnet.train.loop import seed_everything

VARIANTS = {
    "tiny": [],
    "plain encoder": ["model.encoder=plain"],
    "additive mask": ["model.mask_mode=additive"],
    "no sampler": ["model.sampler.kind=none"],
    "released compat": ["model.compat=released", "model.mask_mode=additive", "data.normalize_text=false"],
    "frozen ranking": ["model.retrieval=none", "model.sampler.kind=none"],
}


def _item(cfg: Config, num_queries: int, frames_n: int, seed: int) -> VideoItem:
    rng = np.random.default_rng(seed)
    spec = WindowSpec.from_config(cfg.windows, 2.0)
    duration = frames_n / 2.0
    return VideoItem(
        video_key="v",
        duration_sec=duration,
        frames=torch.from_numpy(rng.standard_normal((frames_n, cfg.data.video_dim), dtype=np.float32)),
        bounds=window_bounds(frames_n, spec.length, spec.stride),
        spec=spec,
        records=[QueryRecord(f"q{i}", "v", "x", 0.0, 1.0, duration, "v", f"q{i}") for i in range(num_queries)],
        texts=[
            rng.standard_normal((int(rng.integers(3, 12)), cfg.data.text_dim), dtype=np.float32)
            for _ in range(num_queries)
        ],
        sentences=[rng.standard_normal(cfg.data.video_dim, dtype=np.float32) for _ in range(num_queries)],
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_inference_equals_eager(variant: str) -> None:
    cfg = load_config("tiny", overrides=["eval.top_k_windows=4", "eval.window_chunk=24", *VARIANTS[variant]])
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).eval()
    item = _item(cfg, 5, 251, seed=1)  # 125.5 s at 2 fps: 12 windows, the last one padded
    cpu = torch.device("cpu")
    eager_rows, eager = infer_video(model, item, replace(cfg.eval, kernels="eager"), cpu, keep_sampling_scores=True)
    fused_rows, fused = infer_video(model, item, replace(cfg.eval, kernels="fused"), cpu, keep_sampling_scores=True)
    np.testing.assert_allclose(fused.context_logit, eager.context_logit, rtol=1e-4, atol=1e-4)
    assert fused.sampling_score is not None and eager.sampling_score is not None
    np.testing.assert_allclose(fused.sampling_score, eager.sampling_score, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused_rows, eager_rows):
        assert len(a.predictions) == len(b.predictions) >= 1
        # spans in seconds (a 125.5 s video) and scores
        np.testing.assert_allclose(np.array(a.predictions), np.array(b.predictions), rtol=1e-4, atol=1e-4)


def test_fused_copy_replaces_every_linear_and_fuses_the_relus() -> None:
    cfg = load_config("tiny")
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    fused = fuse_for_inference(model)
    assert not fused.training and model.training  # the original keeps its mode
    kinds = [type(m) for m in fused.modules()]
    assert torch.nn.Linear not in kinds and torch.nn.ReLU not in kinds
    ffns = [m for m in fused.modules() if isinstance(m, FusedFeedForward)]
    # one FFN per encoder layer (cross + retrieval) and per decoder layer
    assert len(ffns) == cfg.model.cross_layers + cfg.model.retrieval_layers + cfg.model.decoder_layers
    relu = [m for m in fused.modules() if isinstance(m, FusedLinear) and m.act == "relu"]
    # FFN first layers, the two input projections' first layers, and the hidden layers of the decoder's MLPs
    assert len(relu) > len(ffns) + 2
    # the state dict of the eager model is untouched; the copy holds no trainable parameter
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in fused.parameters())


def test_fused_ffn_in_row_blocks_equals_the_eager_ffn(monkeypatch: pytest.MonkeyPatch) -> None:
    from rgnet.model import fused as fused_module
    from rgnet.model.layers import FeedForward

    seed_everything(0)
    ffn = FeedForward(16, 64, 0.1).eval()
    x = torch.randn(3, 37, 16)
    monkeypatch.setattr(fused_module, "FFN_BLOCK_ROWS", 10)  # 111 rows: 12 blocks, the last one short
    assert fused_module.ffn_block_rows() < 111
    with torch.no_grad():
        np.testing.assert_allclose(FusedFeedForward(ffn)(x), ffn(x), rtol=1e-5, atol=1e-5)
