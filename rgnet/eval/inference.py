"""Two-stage inference (DESIGN.md section 5): retrieve windows with the encoder, ground only the top-k.

For each video: the frames are projected once; the encoder and the context score run on every (window, query) pair,
in passes of a few thousand frames (``eval.pass_frames``), the queries in groups, so that memory stays bounded by
``eval.window_chunk`` pairs on a 3-hour movie and for any number of queries; a running top-k per query keeps the
encoded proposals of the best windows seen so far (nothing else is retained).  The decoder then runs on the k kept
windows per query only, so decoder cost is constant in video length for a fixed k (the paper's efficiency claim,
which the released code does not realise: it decodes every window).  Moment score = p_fg * sigmoid(s_ctx); spans go
to seconds, are clipped to [0, duration], NMS-ed (IoU > nms_iou suppresses) and capped at ``max_predictions``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rgnet.config import EvalConfig, WindowConfig
from rgnet.data.dataset import SplitData
from rgnet.data.samples import VideoItem, gather_windows, iter_videos, pad_texts
from rgnet.data.windows import positive_windows, rank_windows, window_cw_to_sec
from rgnet.eval.predictions import PredictionRow
from rgnet.model.embeddings import video_positions
from rgnet.model.fused import inference_model
from rgnet.model.rgnet import EncoderOutput, RGNet
from rgnet.span_ops import temporal_nms


@dataclass
class VideoScores:
    """What the retrieval stage saw for each query of a video (for the retrieval metric and for plots)."""

    context_logit: Tensor  # (q, P) context score of every window
    sampling_score: Tensor | None  # (B, P, Lv) frame sampling scores, when requested


def _frame_starts(item: VideoItem, which: Tensor) -> tuple[Tensor, Tensor]:
    b = torch.from_numpy(item.bounds)[which.cpu()]
    return b[..., 0].float(), (b[..., 1] - b[..., 0]).float()


def _concat_select(a: Tensor | None, b: Tensor, index: Tensor) -> Tensor:
    """cat([a, b], dim=1) gathered at ``index`` (q, k) along dim 1, for tensors (q, n, ...)."""
    both = b if a is None else torch.cat([a, b], dim=1)
    shape = index.shape + both.shape[2:]
    idx = index.view(*index.shape, *([1] * (both.dim() - 2))).expand(shape)
    return torch.gather(both, 1, idx)


def project_video(model: RGNet, frames: Tensor, block_rows: int, device: torch.device) -> Tensor:
    """``video_proj`` of every frame of a video, once: (T, Dv) -> (T + 1, D), the last row being the projection of a
    zero (padding) frame, which is what a padded window position holds after projection.

    The projection is per frame, so projecting the video once and gathering windows from it equals projecting each
    gathered window (windows overlap by half at the released stride, and every query group reuses it); rows go
    through in blocks of ``block_rows`` so that the transient memory stays that of one encoder pass.
    """
    t, dv = frames.shape
    pad = model.video_proj(torch.zeros(1, 1, dv, device=device))[0]  # (1, D)
    out = torch.empty(t + 1, pad.shape[-1], device=device, dtype=pad.dtype)
    for a in range(0, t, block_rows):
        b = min(a + block_rows, t)
        out[a:b] = model.video_proj(frames[a:b].to(device)[None])[0]
    out[t:] = pad
    return out


def query_groups(num_queries: int, k: int, window_chunk: int, pass_pairs: int | None = None) -> list[range]:
    """Queries in balanced groups of at most max(1, window_chunk // k): a group's kept top-k encodings (its size x k
    pairs) then never exceed ``window_chunk`` pairs, whatever the number of queries; and at most ``pass_pairs``
    (one window of each query of a group fills an encoder pass)."""
    most = max(1, min(window_chunk // max(1, k), pass_pairs or window_chunk))
    n = -(-num_queries // most)  # ceil
    size = -(-num_queries // n)
    return [range(a, min(a + size, num_queries)) for a in range(0, num_queries, size)]


def pass_pairs(cfg: EvalConfig, length: int) -> int:
    """(query, window) pairs per encoder pass for windows of ``length`` frames: ``eval.pass_frames`` frames, at most
    ``eval.window_chunk`` pairs (the memory bound), at least one."""
    if cfg.pass_frames <= 0:
        return max(1, cfg.window_chunk)
    return max(1, min(cfg.window_chunk, cfg.pass_frames // length))


@torch.no_grad()
def infer_video(
    model: RGNet,
    item: VideoItem,
    cfg: EvalConfig,
    device: torch.device,
    *,
    keep_sampling_scores: bool = False,
) -> tuple[list[PredictionRow], VideoScores]:
    """Predictions for every query of one video (model in eval mode).

    The video is read and projected once (:func:`project_video`); the queries go in groups (:func:`query_groups`),
    and each encoder pass batches the (query, window) pairs of a group, about :func:`pass_pairs` of them (at most
    ``cfg.window_chunk``): memory is bounded by ``window_chunk`` whatever the number of queries and the video's
    length.  With ``cfg.kernels == "fused"`` a CPU model runs as its fused inference copy (:mod:`rgnet.model.fused`).
    """
    model.eval()
    run = inference_model(model, cfg, device)
    q, num_windows, length = len(item.records), len(item.bounds), item.spec.length
    k = min(cfg.top_k_windows, num_windows)
    pairs = pass_pairs(cfg, length)
    projected = project_video(run, item.frames, pairs * length, device)  # (T + 1, D)
    all_logits = torch.empty(q, num_windows)
    sampling = torch.empty(q, num_windows, length) if keep_sampling_scores else None
    rows: list[PredictionRow] = []
    for group in query_groups(q, k, cfg.window_chunk, pairs):
        want = sampling is not None
        kept, logits, samp = _encode_group(run, item, group, projected, k, pairs, device, want)
        all_logits[group.start : group.stop] = logits
        if sampling is not None and samp is not None:
            sampling[group.start : group.stop] = samp
        rows += _decode_kept(run, item, group, kept, cfg, device, pairs)
    return rows, VideoScores(all_logits, sampling)


def _encode_group(
    model: RGNet,
    item: VideoItem,
    group: range,
    projected: Tensor,
    k: int,
    pass_pairs: int,
    device: torch.device,
    keep_sampling_scores: bool,
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Encode every window for the queries ``group`` (g of them), about ``pass_pairs`` pairs per pass, keeping a
    running top-k per query.  Returns the kept encodings (q-major, (g, k, ...)), the context logits (g, P) and,
    when asked, the sampling scores (g, P, W), both on the CPU."""
    g, num_windows, length = len(group), len(item.bounds), item.spec.length
    text, text_mask = pad_texts([item.texts[i] for i in group])
    text, text_mask = text.to(device), text_mask.to(device)
    sentence = None
    if item.sentences is not None:
        sentence = torch.from_numpy(np.stack([item.sentences[i] for i in group])).to(device)
    chunk = max(1, pass_pairs // g)  # windows per encoder pass: g * chunk ~ pass_pairs pairs
    t = item.frames.shape[0]
    bounds = torch.from_numpy(item.bounds)
    logits = torch.empty(g, num_windows)
    sampling = torch.empty(g, num_windows, length) if keep_sampling_scores else None
    kept: dict[str, Tensor] = {}
    for c0 in range(0, num_windows, chunk):
        which = torch.arange(c0, min(c0 + chunk, num_windows))
        c = len(which)
        idx = bounds[which, :1] + torch.arange(length)[None, :]  # (c, W) frame index
        wmask = idx < bounds[which, 1:2]
        windows = projected[torch.where(wmask, idx, t).to(projected.device)]  # (c, W, D), padding = projected zero
        # the raw windows are read only by frozen-feature ranking (model.retrieval=none)
        raw = windows
        if model.context_head is None:
            raw = gather_windows(item.frames, item.bounds, length, which)[0].to(device)
        # pairs in query-major order: pair n = i * c + j  (query i of the group, window j of the chunk)
        window_index = torch.arange(c, device=device).repeat(g)
        text_index = torch.arange(g, device=device).repeat_interleave(c)
        wmask = wmask.to(device)
        enc = model.encode(raw, wmask, text, text_mask, window_index, text_index, sentence, projected=windows)
        logit = enc.context_logit.view(g, c)
        logits[:, c0 : c0 + c] = logit.float().cpu()
        if sampling is not None:
            sampling[:, c0 : c0 + c] = enc.sampling_score.view(g, c, -1).float().cpu()
        # running top-k per query over (kept so far) + (this chunk)
        new = {
            "logit": logit,
            "window": which.to(device).expand(g, c),
            "memory": enc.memory.view(g, c, *enc.memory.shape[1:]),
            "memory_mask": enc.memory_mask.view(g, c, -1),
        }
        cand = new["logit"] if not kept else torch.cat([kept["logit"], new["logit"]], dim=1)
        top = cand.topk(min(k, cand.shape[1]), dim=1).indices  # (g, k')
        kept = {name: _concat_select(kept.get(name), tensor, top) for name, tensor in new.items()}
    return kept, logits, sampling


def _decode_kept(
    model: RGNet,
    item: VideoItem,
    group: range,
    kept: dict[str, Tensor],
    cfg: EvalConfig,
    device: torch.device,
    pass_pairs: int,
) -> list[PredictionRow]:
    """Decode the kept windows of the queries ``group`` (g x k pairs), ``pass_pairs`` pairs at a time (each pair is
    decoded on its own, so the passes only bound the decoder's memory), then NMS per query."""
    g = kept["logit"].shape[0]
    memory, memory_mask = kept["memory"].flatten(0, 1), kept["memory_mask"].flatten(0, 1)  # (g*k, W, ...)
    context_logit = kept["logit"].flatten()
    logits, spans = [], []
    for a in range(0, len(context_logit), pass_pairs):
        b = slice(a, a + pass_pairs)
        # the frames' sine positions depend on the window's valid mask only: recomputed here (what encode did)
        # rather than kept, which halves the kept encodings' memory
        pos = video_positions(memory_mask[b], model.cfg.hidden_dim, model.cfg.pos_temperature).to(memory.dtype)
        enc = EncoderOutput(
            memory=memory[b],  # (pairs, W, D)
            memory_mask=memory_mask[b],
            pos=pos,
            context_logit=context_logit[b],
            frame_logit=torch.empty(0),
            gate=torch.empty(0),
            sampling_score=torch.empty(0),
        )
        dec = model.decode(enc)
        logits.append(dec.logits[-1].float())
        spans.append(dec.spans_cw[-1].float().cpu())
    p_fg = torch.cat(logits).softmax(-1)[..., 0]  # (g*k, Q)
    score = p_fg * torch.sigmoid(context_logit.float())[:, None]
    start, length = _frame_starts(item, kept["window"].flatten())
    sec = window_cw_to_sec(torch.cat(spans), start, length, item.spec.fps)  # (g*k, Q, 2)
    sec = sec.clamp(0.0, item.duration_sec)
    sec = sec.view(g, -1, 2)  # (g, k*Q, 2)
    score = score.cpu().view(g, -1)
    if cfg.fusion == "matching":
        score = _fuse_matching(item, group, sec, score)
    return [_finish_row(item, i, sec[n], score[n], cfg) for n, i in enumerate(group)]


def _finish_row(item: VideoItem, i: int, sec: Tensor, score: Tensor, cfg: EvalConfig) -> PredictionRow:
    keep = temporal_nms(sec, score, cfg.nms_iou, max_keep=cfg.max_predictions)
    preds = torch.cat([sec[keep], score[keep, None]], dim=1)
    rec = item.records[i]
    return PredictionRow(query_id=rec.query_id, video_id=rec.video_id, predictions=preds.tolist(), windows=None)


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(dim=-1, keepdim=True).values, x.max(dim=-1, keepdim=True).values
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-12), x)


def _fuse_matching(item: VideoItem, group: range, sec: Tensor, score: Tensor) -> Tensor:
    """The released code's score fusion: min-max(proposal score) + min-max(frozen matching score).

    Matching score of a span = sum of the 3 highest cosine similarities between the query's sentence feature and
    the frozen frames inside the span (RGNet's modification of CONE's fine-grained matching).
    """
    if item.sentences is None:
        raise ValueError("eval.fusion=matching needs sentence features (data.sentence_features); this dataset has none")
    frames = F.normalize(item.frames, dim=-1)  # (T, Dv)
    sent = F.normalize(torch.from_numpy(np.stack([item.sentences[i] for i in group])), dim=-1)  # (g, Dv)
    sim = sent @ frames.T  # (q, T)
    fps, t = item.spec.fps, frames.shape[0]
    s_f = (sec[..., 0] * fps).floor().long().clamp(0, t - 1)  # (q, n)
    e_f = (sec[..., 1] * fps).ceil().long().clamp(1, t)
    span_len = int((e_f - s_f).clamp(min=1).max())
    idx = s_f[..., None] + torch.arange(span_len)  # (q, n, Ls)
    inside = idx < e_f[..., None]
    vals = torch.gather(sim[:, None, :].expand(-1, idx.shape[1], -1), 2, idx.clamp(max=t - 1))
    vals = vals.masked_fill(~inside, float("-inf"))
    top = vals.topk(min(3, span_len), dim=-1).values
    match = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).sum(-1)  # (q, n)
    return _minmax(score) + _minmax(match)


def window_rows(item: VideoItem, scores: VideoScores, rows: list[PredictionRow]) -> list[PredictionRow]:
    """Attach the ranked windows ([start_sec, end_sec, sigmoid(s_ctx)], best first) for the retrieval metric."""
    bounds_sec = torch.from_numpy(item.bounds).double() / item.spec.fps
    out = []
    for i, row in enumerate(rows):
        order = rank_windows(scores.context_logit[i])
        prob = torch.sigmoid(scores.context_logit[i][order].double())
        wins = torch.cat([bounds_sec[order], prob[:, None]], dim=1)
        out.append(PredictionRow(row.query_id, row.video_id, row.predictions, wins.tolist()))
    return out


@torch.no_grad()
def infer_oracle(model: RGNet, item: VideoItem, cfg: EvalConfig, device: torch.device) -> list[PredictionRow]:
    """Oracle grounding: decode only the window that holds most of the GT moment; score = p_fg."""
    model.eval()
    fps = item.spec.fps
    which = []
    for rec in item.records:
        s_f, e_f = rec.start_sec * fps, rec.end_sec * fps
        pos = positive_windows(item.bounds, s_f, e_f)
        overlap = np.minimum(item.bounds[pos, 1], e_f) - np.maximum(item.bounds[pos, 0], s_f)
        which.append(int(pos[int(np.argmax(overlap))]))
    which_t = torch.tensor(which)
    windows, wmask = gather_windows(item.frames, item.bounds, item.spec.length, which_t)
    text, text_mask = pad_texts(item.texts)
    q = len(item.records)
    sentence = torch.from_numpy(np.stack(item.sentences)).to(device) if item.sentences is not None else None
    idx = torch.arange(q, device=device)
    enc = model.encode(windows.to(device), wmask.to(device), text.to(device), text_mask.to(device), idx, idx, sentence)
    dec = model.decode(enc)
    score = dec.logits[-1].float().softmax(-1)[..., 0].cpu()  # (q, Q)
    start, length = _frame_starts(item, which_t)
    sec = window_cw_to_sec(dec.spans_cw[-1].float().cpu(), start, length, fps).clamp(0.0, item.duration_sec)
    return [_finish_row(item, i, sec[i], score[i], cfg) for i in range(q)]


def predict_split(
    model: RGNet,
    data: SplitData,
    windows: WindowConfig,
    eval_cfg: EvalConfig,
    device: torch.device,
    *,
    records: Sequence[object] | None = None,
    progress: bool = False,
) -> Iterator[PredictionRow]:
    """Prediction rows (with ranked windows) for every query of a split, one video at a time: the windows cut by
    the ``windows`` section, inference as the ``eval`` section says."""
    videos = iter_videos(data, windows, records)  # type: ignore[arg-type]
    if progress:
        from tqdm import tqdm

        by_video = {r.video_key for r in (records or data.records)}  # type: ignore[attr-defined]
        videos = tqdm(videos, total=len(by_video), desc="evaluate", unit="video", leave=False)
    for item in videos:
        if eval_cfg.oracle:
            yield from infer_oracle(model, item, eval_cfg, device)
            continue
        rows, scores = infer_video(model, item, eval_cfg, device)
        yield from window_rows(item, scores, rows)
