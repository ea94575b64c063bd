"""``rgnet bench``: training throughput, two-stage inference latency vs video length, peak memory, FLOP/s.

Every measurement runs in a fresh subprocess so that its peak memory (ru_maxrss) is its own.  Numbers are printed
and written as JSON.  Inputs are random features of the requested shapes (the model's cost does not depend on the
values), so no dataset is needed.

Defaults are the issue's reference setting: full-size model (D 256, 2+2 encoder layers, 6 decoder layers, FFN 2048,
5 queries), 300-frame training windows at 5 fps with 512-d features, batch 8 (64 query-window pairs per step);
inference on one query over 10 min / 1 h / 2 h movies at 5 fps with W = 900 and top-30 windows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rgnet.io import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rgnet bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        action="store_true",
        help="benchmark the Ray Data training pipeline instead: throughput vs one process, worker memory under a "
        "budget (options: rgnet bench --data --help)",
    )
    p.add_argument(
        "--quality",
        action="store_true",
        help="does distributed training train the local model? rgnet train and rgnet train --local over several seeds "
        "(options: rgnet bench --quality --help)",
    )
    p.add_argument("--out", default="bench_model.json", help="JSON file for the results (default: %(default)s)")
    p.add_argument("--preset", default=None, help="take the model config from this preset (default: full-size RGNet)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype on CUDA")
    p.add_argument("--batch-size", type=int, default=8, help="queries per training step (pairs = B^2)")
    p.add_argument("--window-frames", type=int, default=300, help="frames per training window")
    p.add_argument("--feature-dim", type=int, default=512, help="video and text feature width")
    p.add_argument("--train-steps", type=int, default=4, help="timed training steps (after 1 warm-up step)")
    p.add_argument("--fps", type=float, default=5.0, help="feature rate of the inference videos")
    p.add_argument("--infer-window", type=int, default=900, help="W (frames) at inference")
    p.add_argument("--top-k", type=int, default=30, help="windows decoded per query")
    p.add_argument(
        "--video-minutes", type=float, nargs="+", default=[10, 60, 120], help="inference video lengths (minutes)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed inference runs per length (median reported)")
    p.add_argument("--window-chunk", type=int, default=0, help="eval.window_chunk at inference (0 = the default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--part", choices=["all", "train", "infer", "peak"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--minutes", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _model_config(args: argparse.Namespace) -> Any:
    from rgnet.config import ModelConfig, load_config

    if args.preset:
        return load_config(args.preset).model
    return ModelConfig(
        hidden_dim=256,
        num_heads=8,
        ffn_dim=2048,
        cross_layers=2,
        retrieval_layers=2,
        decoder_layers=6,
        num_queries=5,
        input_dropout=0.5,
    )


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_matmul_peak(device: Any, seconds: float = 2.0) -> float:
    """Measured dense fp32 matmul FLOP/s of this machine (the denominator of the utilisation figure)."""
    import torch

    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rgnet.config import Config, LossConfig, OptimConfig, TrainConfig
    from rgnet.model import Criterion, build_model, build_pairs
    from rgnet.train.loop import build_optimizer, build_scheduler, train_step

    device = torch.device(args.device)
    torch.manual_seed(0)
    mcfg = _model_config(args)
    b, lv, d = args.batch_size, args.window_frames, args.feature_dim
    model = build_model(mcfg, d, d).to(device)
    cfg = Config(
        model=mcfg, loss=LossConfig(), optim=OptimConfig(), train=TrainConfig(precision=args.precision, batch_size=b)
    )
    criterion = Criterion(cfg.loss).to(device)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 100)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.precision == "fp16")
    pw, pt, pp = build_pairs(b, "in_batch", torch.full((b,), -1))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lv // 2, lv + 1, (b,), generator=g)
    lengths[0] = lv
    batch = {
        "video": torch.randn(b, lv, d, generator=g),
        "video_mask": torch.arange(lv)[None] < lengths[:, None],
        "text": torch.nn.functional.normalize(torch.randn(b, 20, d, generator=g), dim=-1),
        "text_mask": torch.ones(b, 20, dtype=torch.bool),
        "span_cw": torch.tensor([[0.5, 0.2]]).repeat(b, 1),
        "in_frame": torch.zeros(b, dtype=torch.long) + 10,
        "out_frame": torch.zeros(b, dtype=torch.long) + 100,
        "neg_window": torch.full((b,), -1),
        "pair_window": pw,
        "pair_text": pt,
        "positive_pair": pp,
    }
    train_step(model, criterion, batch, opt, sched, cfg, device, scaler)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        train_step(model, criterion, batch, opt, sched, cfg, device, scaler)
    _sync(device)
    step_s = (time.perf_counter() - t0) / args.train_steps
    with FlopCounterMode(display=False) as fc:
        train_step(model, criterion, batch, opt, sched, cfg, device, scaler)
    flops = fc.get_total_flops()
    peak = bench_matmul_peak(device)
    out = {
        "batch_queries": b,
        "pairs_per_step": int(pw.numel()),
        "window_frames": lv,
        "step_seconds": step_s,
        "queries_per_s": b / step_s,
        "window_pairs_per_s": pw.numel() / step_s,
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_matmul_peak": flops / step_s / peak,
        "peak_rss_gib": _peak_rss_gib(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_infer(args: argparse.Namespace, minutes: float) -> dict[str, Any]:
    """Latency of one query over a video of ``minutes`` minutes; encoder and decoder timed separately."""
    import numpy as np
    import torch

    from rgnet.config import EvalConfig
    from rgnet.data.records import QueryRecord
    from rgnet.data.samples import VideoItem, WindowSpec
    from rgnet.data.windows import window_bounds
    from rgnet.eval.inference import infer_video
    from rgnet.model import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    d = args.feature_dim
    model = build_model(_model_config(args), d, d).to(device).eval()
    frames_n = round(minutes * 60 * args.fps)
    spec = WindowSpec(args.infer_window, args.infer_window // 2, args.fps)
    rng = np.random.default_rng(0)
    item = VideoItem(
        video_key="bench",
        duration_sec=frames_n / args.fps,
        frames=torch.from_numpy(rng.standard_normal((frames_n, d), dtype=np.float32)),
        bounds=window_bounds(frames_n, spec.length, spec.stride),
        spec=spec,
        records=[QueryRecord("q", "bench", "a query", 1.0, 5.0, frames_n / args.fps, "bench", "q")],
        texts=[rng.standard_normal((20, d), dtype=np.float32)],
        sentences=None,
    )
    cfg = EvalConfig(top_k_windows=args.top_k)
    if args.window_chunk:
        cfg.window_chunk = args.window_chunk
    timings: dict[str, float] = {"encode": 0.0, "decode": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            _sync(device)
            t0 = time.perf_counter()
            r = fn(*a, **k)
            _sync(device)
            timings[name] += time.perf_counter() - t0
            return r

        return wrapper

    encode, decode = model.encode, model.decode
    model.encode = timed("encode", encode)  # type: ignore[method-assign]
    model.decode = timed("decode", decode)  # type: ignore[method-assign]
    infer_video(model, item, cfg, device)  # warm-up
    runs = []
    for _ in range(max(1, args.repeats)):  # the median of a few runs: one run is at the mercy of the allocator
        timings.update(encode=0.0, decode=0.0)
        t0 = time.perf_counter()
        rows, _ = infer_video(model, item, cfg, device)
        total = time.perf_counter() - t0
        runs.append((total, timings["encode"], timings["decode"]))
    total, enc_s, dec_s = (float(np.median([r[i] for r in runs])) for i in range(3))
    out = {
        "video_minutes": minutes,
        "frames": frames_n,
        "windows": len(item.bounds),
        "top_k": min(args.top_k, len(item.bounds)),
        "repeats": len(runs),
        "latency_s": total,
        "encoder_s": enc_s,
        "decoder_s": dec_s,
        "post_s": total - enc_s - dec_s,
        "latency_runs_s": [r[0] for r in runs],
        "decoder_runs_s": [r[2] for r in runs],
        "predictions": len(rows[0].predictions),
        "peak_rss_gib": _peak_rss_gib(),
    }
    # FLOPs of one query (counted by torch), and the time they need at the measured matmul peak: a floor no
    # implementation of this computation reaches on this machine
    from torch.utils.flop_counter import FlopCounterMode

    for p in model.parameters():
        p.requires_grad_(False)  # the counter's module tracker trips over leaf parameters under no_grad
    flops = {"encode": 0, "decode": 0}

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            with FlopCounterMode(display=False) as fc:
                r = fn(*a, **k)
            flops[name] += fc.get_total_flops()
            return r

        return wrapper

    model.encode, model.decode = counted("encode", encode), counted("decode", decode)  # type: ignore[method-assign]
    infer_video(model, item, cfg, device)
    peak = bench_matmul_peak(device)
    out.update(
        encoder_flops=flops["encode"],
        decoder_flops=flops["decode"],
        matmul_peak_flops_per_s=peak,
        encoder_floor_s=flops["encode"] / peak,
        decoder_floor_s=flops["decode"] / peak,
        encoder_fraction_of_peak=flops["encode"] / enc_s / peak,
    )
    return out


def _child(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_train(args) if args.part == "train" else bench_infer(args, args.minutes)
    print("RESULT " + json.dumps(result))
    return 0


def _run_child(argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.bench", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"benchmark child {argv} failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data" in argv:  # the Ray Data pipeline benchmark has its own options
        from pipelines import bench_data

        return bench_data.main(argv)
    if "--quality" in argv:  # local vs distributed training over seeds: its own options
        from pipelines import bench_quality

        return bench_quality.main(argv)
    args = build_parser().parse_args(argv)
    if args.part != "all":
        return _child(args)
    import torch

    common = [
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--batch-size",
        str(args.batch_size),
        "--window-frames",
        str(args.window_frames),
        "--feature-dim",
        str(args.feature_dim),
        "--train-steps",
        str(args.train_steps),
        "--fps",
        str(args.fps),
        "--infer-window",
        str(args.infer_window),
        "--top-k",
        str(args.top_k),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--window-chunk",
        str(args.window_chunk),
    ] + (["--preset", args.preset] if args.preset else [])
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "precision": args.precision,
        },
    }
    print("training step ...", flush=True)
    tr = _run_child([*common, "--part", "train"])
    results["train"] = tr
    print(
        f"  train: {tr['window_pairs_per_s']:.2f} window-pairs/s, {tr['queries_per_s']:.2f} queries/s "
        f"({tr['step_seconds']:.2f} s/step, {tr['pairs_per_step']} pairs), peak RSS {tr['peak_rss_gib']:.2f} GiB, "
        f"{tr['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * tr['fraction_of_matmul_peak']:.1f}% of matmul peak "
        f"({tr['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s)",
        flush=True,
    )
    results["inference"] = []
    for minutes in args.video_minutes:
        r = _run_child([*common, "--part", "infer", "--minutes", str(minutes)])
        results["inference"].append(r)
        print(
            f"  infer {minutes:>5.0f} min ({r['windows']} windows): {r['latency_s']:.2f} s/query "
            f"(encoder {r['encoder_s']:.2f} s = {100 * r['encoder_fraction_of_peak']:.0f}% of matmul peak, floor "
            f"{r['encoder_floor_s']:.2f} s; decoder {r['decoder_s']:.3f} s, post {r['post_s']:.3f} s; median of "
            f"{r['repeats']}), peak RSS {r['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    dec = [r["decoder_s"] for r in results["inference"]]
    results["decoder_time_ratio_longest_to_shortest"] = dec[-1] / dec[0] if dec and dec[0] > 0 else None
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
