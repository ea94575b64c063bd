"""An inference-only copy of RGNet whose linear layers run as oneDNN kernels with the bias and ReLU fused.

Why: in eager PyTorch on CPU, ``nn.Linear`` is ``addmm``: MKL's sgemm on an output pre-filled with the bias (a
copy pass over every output), and the FFN's ReLU is one more pass over its (rows, ffn_dim) activation.  A profile
of the encoder (issue 16) put ``addmm`` at 54% of the time, the bias copies at 9% and ReLU at 9%.  oneDNN's
matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor emits for a frozen linear) adds the bias and
applies the ReLU in the GEMM's epilogue, while the output tile is still in registers, and on AVX-512 machines its
JIT-generated GEMM is also faster than the sgemm MKL picks on non-Intel CPUs (measured on the project's AMD EPYC:
see the README, "Performance").  The weights are reordered once, into oneDNN's blocked layout, and the FFN runs over
row blocks whose hidden activation fits in cache (:data:`FFN_BLOCK_ROWS`).

The copy computes the same function as the eager model (same weights; only the floating-point summation order of
the GEMMs differs: ``tests/test_fused.py`` checks context scores and spans within 1e-4).  It is for inference only:
no parameter is trainable and dropout is off.  Training never sees it; :func:`inference_model` builds it (and
keeps it while the eager model's weights are unchanged) for :func:`rgnet.eval.inference.infer_video` when
``eval.kernels=fused`` (the default) on a CPU.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from rgnet.config import EvalConfig
from rgnet.model.layers import FeedForward
from rgnet.model.rgnet import RGNet


def fused_kernels_available() -> bool:
    """oneDNN is compiled in and exposes the fused linear op (true for the official x86/ARM CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FusedLinear(nn.Module):
    """y = act(x W^T + b) in one oneDNN call; ``act`` is "none" or "relu".  Any leading dimensions."""

    def __init__(self, linear: nn.Linear, act: str = "none", rows_hint: int = 4096) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act = linear.in_features, linear.out_features, act
        weight = linear.weight.detach().float().contiguous()
        # oneDNN's blocked weight layout, reordered once (the rows hint only guides the layout choice)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.act, [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}"


# Rows of the FFN per block, per 2 threads.  The (rows, ffn_dim) hidden activation of a block (2048 x 2048 floats =
# 16 MiB at the full size) stays in the last-level cache between the two GEMMs instead of making a round trip through
# memory; measured on the project's 2-core AMD EPYC (32 MiB L3), 1 thread, a 256 -> 2048 -> 256 FFN over 28,800 rows:
# 186 GFLOP per CPU-second in blocks of 2048 rows, 175 at 1024, 128 at 4096 and 8192, 126 unblocked.
FFN_BLOCK_ROWS = 2048


def ffn_block_rows() -> int:
    return FFN_BLOCK_ROWS * max(1, torch.get_num_threads() // 2)


class FusedFeedForward(nn.Module):
    """:class:`rgnet.model.layers.FeedForward` at inference: Linear+ReLU fused, then Linear (bias fused), over
    blocks of :func:`ffn_block_rows` rows so that the wide hidden activation stays in cache."""

    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        self.linear1 = FusedLinear(ffn.linear1, "relu")
        self.linear2 = FusedLinear(ffn.linear2)

    def forward(self, x: Tensor, rng: Any = None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (rows, D)
        rows, block = flat.shape[0], ffn_block_rows()
        if rows <= block:
            return self.linear2(self.linear1(flat)).view(*x.shape[:-1], -1)
        out = flat.new_empty(rows, self.linear2.out_features)
        for a in range(0, rows, block):
            out[a : a + block] = self.linear2(self.linear1(flat[a : a + block]))
        return out.view(*x.shape[:-1], -1)


def _fuse_children(module: nn.Module) -> None:
    """Replace, below ``module``, every FeedForward, every Linear followed by a ReLU in a Sequential (the input
    projections, the decoder MLPs) and every other Linear by its fused counterpart."""
    for name, child in list(module.named_children()):
        if isinstance(child, FeedForward):
            setattr(module, name, FusedFeedForward(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, FusedLinear(child))
        elif isinstance(child, nn.Sequential):
            items = list(child)
            for i, item in enumerate(items):
                if isinstance(item, nn.Linear):
                    relu = i + 1 < len(items) and isinstance(items[i + 1], nn.ReLU)
                    child[i] = FusedLinear(item, "relu" if relu else "none")
                    if relu:
                        child[i + 1] = nn.Identity()
                else:
                    _fuse_children(item)
        else:
            _fuse_children(child)


def fuse_for_inference(model: RGNet) -> RGNet:
    """A fused, frozen, eval-mode copy of ``model`` (on CPU, float32); ``model`` itself is not changed."""
    if not fused_kernels_available():
        raise RuntimeError("this torch build has no oneDNN fused linear kernel; use eval.kernels=eager")
    fused = copy.deepcopy(model).cpu().float().eval()
    fused.requires_grad_(False)
    _fuse_children(fused)
    return fused


# the fused copy per eager model, rebuilt when the model's weights change (an optimizer step or load_state_dict
# bumps the tensors' version counters); weak keys: a copy dies with its model
_CACHE: weakref.WeakKeyDictionary[RGNet, tuple[tuple[int, ...], RGNet]] = weakref.WeakKeyDictionary()


def _weights_stamp(model: RGNet) -> tuple[int, ...]:
    return tuple(t._version for t in (*model.parameters(), *model.buffers())) + tuple(
        t.data_ptr() for t in model.parameters()
    )


def inference_model(model: RGNet, cfg: EvalConfig, device: torch.device) -> RGNet:
    """The module that inference should run: the fused copy of ``model`` when ``cfg.kernels == "fused"``, the device
    is a CPU and the model is float32 on it; otherwise ``model`` itself (CUDA has its own fused GEMM epilogues)."""
    if cfg.kernels == "eager" or device.type != "cpu" or not fused_kernels_available():
        return model
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.float32:
        return model
    stamp = _weights_stamp(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    fused = fuse_for_inference(model)
    _CACHE[model] = (stamp, fused)
    return fused
