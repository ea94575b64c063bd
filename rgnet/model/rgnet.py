"""RGNet: the unified retrieval and grounding network (Hannan et al., arXiv 2312.06729), and its input/output schema.

Glossary (``rgnet`` package docstring): B queries, P distinct windows in a batch, N query-window pairs, M decoded pairs,
Lv frames per window, Lq words, Dv / Dt video / text feature widths, D hidden, Q moment queries, L decoder layers.

Batch schema (what ``forward`` reads; built by ``rgnet.data.samples.collate_train``)::

    video        (P, Lv, Dv) float  distinct windows: [B positive windows (window b belongs to query b);
                                    then the optional same-video negative windows]
    video_mask   (P, Lv) bool       True = valid frame
    text         (B, Lq, Dt) float  word features (L2-normalised per token by the data pipeline; raw with
                                    model.compat=released, which normalises them in ``encode``)
    text_mask    (B, Lq) bool       True = valid word
    pair_window  (N,) long          pair n = (query pair_text[n], window pair_window[n]); see ``build_pairs``
    pair_text    (N,) long
    positive_pair (B,) long         index into N of query b's positive pair (query b, window b)
    sentence     (B, Dv) float      optional; sentence features in the video tower's space (retrieval="none" only)
    window_key   (P,) long          optional; keys of the windows' random streams (rgnet.model.randomness): with
    text_key     (B,) long          them, training draws (dropout, Gumbel noise) depend only on the keys

Output schema (``forward``)::

    {"encoder": EncoderOutput for all N pairs,
     "decoder": DecoderOutput for the B positive pairs (M = B, in query order),
     "learned_context": 0-d bool tensor, False when the context score has no parameters (retrieval="none"), so the
                        criterion skips the contrastive loss}

    EncoderOutput (N pairs)                              DecoderOutput (M pairs)
      memory         (N, Lv, D)  encoded proposal P        logits    (L, M, Q, 2) class logits per decoder layer,
      memory_mask    (N, Lv) bool, True = valid frame                 index 0 = foreground, 1 = background
      pos            (N, Lv, D)  frame sine positions      spans_cw  (L, M, Q, 2) (center, width) in [0, 1] of the
      context_logit  (N,)        context score s_ctx                  window's valid length
      frame_logit    (N, Lv)     sampler relevancy logit z
      gate           (N, Lv)     gate g in {0, 1}
      sampling_score (N, Lv)     sampling score s_j (Eq. 7)

Component choices (DESIGN section 3.9, the paper's ablations) are composition, chosen by ModelConfig:
``encoder`` rg | plain, ``sampler.kind`` gumbel | none, ``mask_mode`` hard | additive | none, ``retrieval``
context | none.  The disjoint (CONE-like) baseline is sampler none + retrieval none: windows ranked by frozen
features, grounded by the same decoder on un-gated features.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rgnet.config import ModelConfig
from rgnet.model.decoder import AnchorDecoder, inverse_sigmoid
from rgnet.model.embeddings import InputProjection, released_token_norm, video_positions
from rgnet.model.encoder import PlainEncoder, RGEncoder
from rgnet.model.layers import MLP
from rgnet.model.randomness import BatchRandom, RowRandom
from rgnet.model.retrieval import ContextScore, frozen_context_logit


class EncoderOutput(NamedTuple):
    """Encoder results for N query-window pairs (shapes in the module docstring)."""

    memory: Tensor  # (N, Lv, D) encoded proposal P = c + g * r (Eq. 5); plain encoder: frame states
    memory_mask: Tensor  # (N, Lv) bool, True = valid frame
    pos: Tensor  # (N, Lv, D) sine positions of the frames (decoder key positions)
    context_logit: Tensor  # (N,) context score s_ctx (Sec. 3.3); retrieval=none: frozen-feature max cosine
    frame_logit: Tensor  # (N, Lv) sampler relevancy logit z (zeros without a sampler)
    gate: Tensor  # (N, Lv) hard gate g in {0, 1} (straight-through in training); ones without a sampler
    sampling_score: Tensor  # (N, Lv) s_j of Eq. 7


class DecoderOutput(NamedTuple):
    """Decoder results for M pairs, one entry per decoder layer (the last is the prediction)."""

    logits: Tensor  # (L, M, Q, 2) class logits, index 0 = foreground, 1 = background
    spans_cw: Tensor  # (L, M, Q, 2) (center, width) in [0, 1] relative to the window's valid length


def build_pairs(
    num_queries: int, negatives: str, neg_window: Tensor | None, *, num_windows: int | None = None, offset: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Lay out the (query, window) pairs of a training batch (or of one rank's part of it, see
    ``rgnet.data.samples.assemble_step``).

    Windows are [``num_windows`` positive windows (default ``num_queries``); then optional same-video negative
    windows]; local query b's positive window is ``offset + b`` (offset: its slot in the global batch);
    ``neg_window`` (B,) long holds query b's negative window index (>= num_windows) or -1 (None = no negatives).
    - in_batch: query b with every positive window, pair b * num_windows + w (the released code's layout).
    - same_video: (b, offset + b) for every b, then (b, neg_window[b]) for the queries that have one.
    - both: the in_batch pairs, then (b, neg_window[b]).
    Returns pair_window (N,), pair_text (N,), positive_pair (B,) (index into N of query b's positive pair).
    """
    b = num_queries
    w = num_queries if num_windows is None else num_windows
    device = neg_window.device if neg_window is not None else torch.device("cpu")
    queries = torch.arange(b, device=device)
    own = queries + offset  # each query's positive window
    if neg_window is None:
        neg_window = torch.full((b,), -1, dtype=torch.long, device=device)
    has_neg = neg_window >= 0
    if negatives == "in_batch":
        return torch.arange(w, device=device).repeat(b), queries.repeat_interleave(w), queries * w + own
    if negatives == "same_video":
        pair_window = torch.cat([own, neg_window[has_neg]])
        pair_text = torch.cat([queries, queries[has_neg]])
        return pair_window, pair_text, queries.clone()
    if negatives == "both":
        pair_window = torch.cat([torch.arange(w, device=device).repeat(b), neg_window[has_neg]])
        pair_text = torch.cat([queries.repeat_interleave(w), queries[has_neg]])
        return pair_window, pair_text, queries * w + own
    raise ValueError(f"loss.negatives={negatives!r} is not one of in_batch, same_video, both")


class RGNet(nn.Module):
    """Encoder (retrieval) + anchor decoder (grounding); see the module docstring for the schemas."""

    def __init__(self, cfg: ModelConfig, video_dim: int, text_dim: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.video_proj = InputProjection(video_dim, d, cfg.input_dropout)
        self.text_proj = InputProjection(text_dim, d, cfg.input_dropout)
        self.encoder: RGEncoder | PlainEncoder = RGEncoder(cfg) if cfg.encoder == "rg" else PlainEncoder(cfg)
        # context score (Sec. 3.3); frozen ranking (retrieval=none) has no head, so no parameter lacks a gradient
        self.context_head = ContextScore(d) if cfg.retrieval == "context" else None
        # W1 of Eq. 7 without b1: <b1, W2 r + b2> is the same for every frame of a pair, so the hinge (a difference
        # of two frames' scores) cancels it and b1 would never get a gradient (it stays at its init when released)
        self.sampling_frame_proj = nn.Linear(d, d, bias=False)
        self.sampling_context_proj = nn.Linear(d, d)  # W2 of Eq. 7
        self.decoder = AnchorDecoder(cfg)
        self.class_head = nn.Linear(d, 2)  # index 0 = foreground, 1 = background
        self.span_head = MLP(d, d, 2, 3)  # offset to the anchor, in inverse-sigmoid space
        self._register_load_state_dict_pre_hook(_upgrade_state_dict)

    def encode(
        self,
        video: Tensor,
        video_mask: Tensor,
        text: Tensor,
        text_mask: Tensor,
        window_index: Tensor,
        text_index: Tensor,
        sentence: Tensor | None = None,
        randomness: BatchRandom | None = None,
        projected: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode N pairs (window_index[n], text_index[n]) of P distinct windows and B distinct queries.

        Each window and each query is projected once, then gathered per pair.  ``sentence`` (B, Dv) is needed only
        for retrieval="none".  ``randomness``: keyed streams of the windows, queries and pairs (training only).
        ``projected`` (W, Lv, D): the windows' ``video_proj`` output when the caller already holds it (inference
        projects a whole video once, :mod:`rgnet.eval.inference`); ``video`` is then read only by frozen ranking.
        """
        if self.context_head is None and sentence is None:
            raise ValueError(
                "model.retrieval=none ranks windows by frozen-feature similarity and needs sentence features; "
                "set data.sentence_features (or use model.retrieval=context)"
            )
        rng = randomness if self.training else None
        frames = self.video_proj(video, rng.windows if rng else None) if projected is None else projected  # (P, Lv, D)
        pos = video_positions(video_mask, self.cfg.hidden_dim, self.cfg.pos_temperature).to(frames.dtype)
        if self.cfg.compat == "released":
            text = released_token_norm(text)  # raw tokens in (data.normalize_text=false), normalised as released
        words = self.text_proj(text, rng.texts if rng else None)  # (B, Lq, D)
        pair_pos = pos.index_select(0, window_index)  # (N, Lv, D)
        pair_mask = video_mask.index_select(0, window_index)  # (N, Lv)
        pair_frames = frames.index_select(0, window_index)  # (N, Lv, D)
        state = self.encoder(pair_frames, pair_pos, pair_mask, words, text_mask, text_index, rng.pairs if rng else None)
        if self.context_head is not None:
            context_logit = self.context_head(state.context)  # (N,)
        else:
            assert sentence is not None
            context_logit = frozen_context_logit(video, video_mask, sentence, window_index, text_index)
        # Eq. 7: s_j = <W1 P_j, W2 r + b2> / sqrt(D)  (b1 dropped, see __init__)
        frame_key = self.sampling_frame_proj(state.content)  # (N, Lv, D)
        context_key = self.sampling_context_proj(state.context)  # (N, D)
        sampling = torch.einsum("nld,nd->nl", frame_key, context_key) / math.sqrt(self.cfg.hidden_dim)
        return EncoderOutput(
            memory=state.content,
            memory_mask=pair_mask,
            pos=pair_pos,
            context_logit=context_logit,
            frame_logit=state.frame_logit,
            gate=state.gate,
            sampling_score=sampling,
        )

    def decode(self, enc: EncoderOutput, select: Tensor | None = None, rng: RowRandom | None = None) -> DecoderOutput:
        """Ground the pairs ``select`` (M,) (None = all); reads only memory, memory_mask and pos.  ``rng``: the M
        selected pairs' keyed streams (training), continuing where the encoder left them."""
        memory, memory_mask, pos = enc.memory, enc.memory_mask, enc.pos
        if select is not None:
            memory, memory_mask, pos = memory[select], memory_mask[select], pos[select]
        states, refs = self.decoder(memory, pos, memory_mask, rng if self.training else None)  # (L,M,Q,D), (L,M,Q,2)
        logits = self.class_head(states)
        spans_cw = torch.sigmoid(self.span_head(states) + inverse_sigmoid(refs))
        return DecoderOutput(logits, spans_cw)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor | EncoderOutput | DecoderOutput]:
        """Training forward: encode every pair, decode the B positive pairs only (the others need no grounding)."""
        randomness = BatchRandom.from_batch(batch, batch["video"].device) if self.training else None
        enc = self.encode(
            batch["video"],
            batch["video_mask"],
            batch["text"],
            batch["text_mask"],
            batch["pair_window"],
            batch["pair_text"],
            batch.get("sentence"),
            randomness,
        )
        positive = batch["positive_pair"]
        dec = self.decode(enc, positive, randomness.pairs.select(positive) if randomness else None)
        learned = torch.tensor(self.context_head is not None, device=enc.context_logit.device)
        return {"encoder": enc, "decoder": dec, "learned_context": learned}


_KEY_BIASES = (".k_proj.bias", ".sa_k_content.bias", ".sa_k_pos.bias", ".ca_k_content.bias", ".ca_k_pos.bias")


def _upgrade_state_dict(state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Load checkpoints written before the key projections and the context head lost their biases (same function):
    attention key biases cancel in the softmax and are dropped; a context-head bias becomes its fixed offset."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith(_KEY_BIASES)]:
        del state[key]
    for old in ("context_head.bias", "context_bias"):
        if prefix + old in state:
            state.setdefault(prefix + "context_head.offset", state.pop(prefix + old).reshape(1))


def build_model(cfg: ModelConfig, video_dim: int, text_dim: int) -> RGNet:
    """The model for ``cfg``; feature widths come from the data config (data.video_dim / data.text_dim)."""
    return RGNet(cfg, video_dim, text_dim)
