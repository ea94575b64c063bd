"""``rgnet bench``: training throughput, two-stage inference latency vs video length and queries per video, peak
memory, and the FLOP floor.

Every measurement runs in a fresh subprocess so that its peak memory (ru_maxrss) is its own.  Numbers are printed
and written as JSON.  Inputs are random features of the requested shapes (the model's cost does not depend on the
values), so no dataset is needed.

Defaults are the issue's reference setting: full-size model (D 256, 2+2 encoder layers, 6 decoder layers, FFN 2048,
5 queries), 300-frame training windows at 5 fps with 512-d features, batch 8 (64 query-window pairs per step);
inference at the MAD sizes: 10 min / 1 h / 2 h movies at 5 fps, windows of 300 and 900 frames at half-window
stride, top-30 windows, Q = 1, 8 and 64 queries per video (one ``infer_video`` call: the video is projected once
and the queries' pairs share the encoder passes).  Per row: latency per query, queries/s, peak memory, the FLOPs
per query counted by torch on the eager model, the floor they need at the matmul peak measured in the same child
(the faster of MKL and oneDNN on a CPU), and latency / floor.  ``train.device=cuda train.precision=bf16`` runs the same
table under bf16 autocast on a GPU, its floor at the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.common import remove_flags, run_guarded
from rgnet.config import Config
from rgnet.io import atomic_write_json

# The benchmark's settings that are config keys (positional key=value), with the benchmark's own defaults
BENCH_DEFAULTS = {
    "train.device": "cpu",
    "train.precision": "fp32",  # autocast dtype on CUDA
    "train.batch_size": 8,  # queries per training step (pairs = B^2)
    "train.threads": 0,  # torch threads (0 = torch's default)
    "data.fps": 5.0,  # feature rate of the inference videos
    "eval.top_k_windows": 30,  # windows decoded per query
    "eval.kernels": "fused",  # CPU inference kernels
}
REMOVED_FLAGS = {  # the flags these keys replaced
    "--device": "train.device",
    "--precision": "train.precision",
    "--batch-size": "train.batch_size",
    "--threads": "train.threads",
    "--fps": "data.fps",
    "--top-k": "eval.top_k_windows",
    "--window-chunk": "eval.window_chunk",
    "--kernels": "eval.kernels",
}
FULL_SIZE_MODEL = {  # the default model: full-size RGNet (the paper's widths)
    "hidden_dim": 256,
    "num_heads": 8,
    "ffn_dim": 2048,
    "cross_layers": 2,
    "retrieval_layers": 2,
    "decoder_layers": 6,
    "num_queries": 5,
    "input_dropout": 0.5,
}


def bench_config(preset: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The benchmark's config: ``preset`` (else the embedded default with the full-size model), the benchmark's
    defaults (:data:`BENCH_DEFAULTS`), then ``overrides``."""
    from rgnet.config import apply_overrides, from_dict, load_config

    base = load_config(preset) if preset else from_dict({"model": FULL_SIZE_MODEL})
    return apply_overrides(base, [*(f"{k}={v}" for k, v in BENCH_DEFAULTS.items()), *overrides])


@dataclass(frozen=True)
class BenchSizes:
    """The benchmark's own sizes (not config keys): frames per training window, feature width, timed training steps,
    queries per video (ascending), timed runs at Q = 1, and the seconds of each matmul peak measurement."""

    window_frames: int = 300
    feature_dim: int = 512
    train_steps: int = 4
    queries: tuple[int, ...] = (1, 8, 64)
    repeats: int = 3
    peak_seconds: float = 2.0


def sizes(args: argparse.Namespace) -> BenchSizes:
    return BenchSizes(
        window_frames=args.window_frames,
        feature_dim=args.feature_dim,
        train_steps=args.train_steps,
        queries=tuple(args.queries),
        repeats=args.repeats,
        peak_seconds=args.peak_seconds,
    )


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
    p.add_argument("--window-frames", type=int, default=300, help="frames per training window")
    p.add_argument("--feature-dim", type=int, default=512, help="video and text feature width")
    p.add_argument("--train-steps", type=int, default=4, help="timed training steps (after 1 warm-up step)")
    p.add_argument(
        "--infer-windows", type=int, nargs="+", default=[300, 900], help="window lengths W (frames) at inference"
    )
    p.add_argument(
        "--video-minutes", type=float, nargs="+", default=[10, 60, 120], help="inference video lengths (minutes)"
    )
    p.add_argument(
        "--queries", type=int, nargs="+", default=[1, 8, 64], help="queries per video Q (one inference call each)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed inference runs at Q = 1 (median reported; one run at Q > 1)"
    )
    p.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="seconds of each matmul peak measurement")
    p.add_argument("--part", choices=["all", "train", "infer", "peak"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--minutes", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="the benchmark's config (--preset's model, else full-size RGNet) read from these keys: "
        + ", ".join(f"{k} (default {v})" for k, v in BENCH_DEFAULTS.items())
        + ", eval.window_chunk and model.*; give them before list options such as --queries",
    )
    remove_flags(p, {flag: f"give {key}=VALUE instead" for flag, key in REMOVED_FLAGS.items()})
    return p


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_matmul_peak(device: Any, precision: str = "fp32", seconds: float = 2.0) -> dict[str, float]:
    """The machine's measured dense matmul FLOP/s (the denominator of the utilisation figures and of the floor).

    CPU, float32: the faster of torch's matmul (MKL's sgemm) and oneDNN's (``mkldnn._linear_pointwise``, what the
    fused inference kernels call): on AVX-512 CPUs that are not Intel's, MKL takes a slower code path, so its peak
    alone would flatter the fused kernels.  CUDA: torch's matmul in the autocast dtype (bf16/fp16) or float32.
    """
    import torch

    from rgnet.model.fused import fused_kernels_available

    n = 2048 if device.type == "cpu" else 8192
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32) if device.type == "cuda" else None
    )
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels: dict[str, Any] = {"torch": lambda: a @ b}
    if device.type == "cpu" and fused_kernels_available():
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out: dict[str, float] = {}
    for name, fn in kernels.items():
        fn()
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            reps += 1
        _sync(device)
        out[name] = 2 * n**3 * reps / (time.perf_counter() - t0)
    out["flops_per_s"] = max(out.values())
    return out


def bench_train(args: BenchSizes, config: Config) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rgnet.config import Config, LossConfig, OptimConfig, TrainConfig
    from rgnet.model import Criterion, build_model
    from rgnet.train.loop import build_optimizer, build_scheduler, resolve_device, train_step

    device = resolve_device(config.train.device)
    precision = config.train.precision
    torch.manual_seed(0)
    mcfg = config.model
    b, lv, d = config.train.batch_size, args.window_frames, args.feature_dim
    model = build_model(mcfg, d, d).to(device)
    cfg = Config(
        model=mcfg, loss=LossConfig(), optim=OptimConfig(), train=TrainConfig(precision=precision, batch_size=b)
    )
    criterion = Criterion(cfg.loss).to(device)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 100)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lv // 2, lv + 1, (b,), generator=g)
    lengths[0] = lv
    # one process's whole global step, as rgnet.data.samples.collate_shard delivers it (train_step assembles the
    # pairs); no same-video negatives: the pairs are the B x B in-batch ones
    batch = {
        "video": torch.randn(b, lv, d, generator=g),
        "video_len": lengths,
        "text": torch.nn.functional.normalize(torch.randn(b, 20, d, generator=g), dim=-1),
        "text_mask": torch.ones(b, 20, dtype=torch.bool),
        "span_cw": torch.tensor([[0.5, 0.2]]).repeat(b, 1),
        "in_frame": torch.full((b,), lv // 2),  # inside the moment (centre 0.5, width 0.2) and every window
        "out_frame": torch.full((b,), lv // 10),  # outside it
        "neg_video": torch.zeros(b, lv, d),
        "neg_len": torch.zeros(b, dtype=torch.long),
    }
    pairs = b * b
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
    peak = bench_matmul_peak(device, precision, args.peak_seconds)["flops_per_s"]
    out = {
        "batch_queries": b,
        "pairs_per_step": pairs,
        "window_frames": lv,
        "step_seconds": step_s,
        "queries_per_s": b / step_s,
        "window_pairs_per_s": pairs / step_s,
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


def _inference_item(args: BenchSizes, fps: float, minutes: float, window: int, num_queries: int) -> Any:
    """A random video of ``minutes`` at ``fps`` and ``num_queries`` random 20-word queries about it."""
    import numpy as np
    import torch

    from rgnet.data.records import QueryRecord
    from rgnet.data.samples import VideoItem, WindowSpec
    from rgnet.data.windows import window_bounds

    d = args.feature_dim
    frames_n = round(minutes * 60 * fps)
    spec = WindowSpec(window, window // 2, fps)
    rng = np.random.default_rng(0)
    duration = frames_n / fps
    return VideoItem(
        video_key="bench",
        duration_sec=duration,
        frames=torch.from_numpy(rng.standard_normal((frames_n, d), dtype=np.float32)),
        bounds=window_bounds(frames_n, spec.length, spec.stride),
        spec=spec,
        records=[
            QueryRecord(f"q{i}", "bench", "a query", 1.0, 5.0, duration, "bench", f"q{i}") for i in range(num_queries)
        ],
        texts=[rng.standard_normal((20, d), dtype=np.float32) for _ in range(num_queries)],
        sentences=None,
    )


def _count_flops(model: Any, item: Any, cfg: Any, device: Any) -> dict[str, int]:
    """FLOPs counted by torch on the eager model for the first query of ``item`` alone: the video projection (shared
    by all the queries of a video), the encoder and the decoder (per query)."""
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from rgnet.eval.inference import infer_video, project_video

    for p in model.parameters():
        p.requires_grad_(False)  # the counter's module tracker trips over leaf parameters under no_grad
    one = replace(item, records=item.records[:1], texts=item.texts[:1])
    flops = {"encode": 0, "decode": 0}
    encode, decode = model.encode, model.decode

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            with FlopCounterMode(display=False) as fc:
                r = fn(*a, **k)
            flops[name] += fc.get_total_flops()
            return r

        return wrapper

    model.encode, model.decode = counted("encode", encode), counted("decode", decode)
    try:
        infer_video(model, one, replace(cfg, kernels="eager"), device)
    finally:
        del model.encode, model.decode  # back to the class methods
    with FlopCounterMode(display=False) as fc:
        project_video(model, item.frames, max(item.spec.length, cfg.window_chunk * item.spec.length), device)
    return {"project": fc.get_total_flops(), **flops}


def bench_infer(args: BenchSizes, config: Config, minutes: float, window: int) -> dict[str, Any]:
    """Latency per query at each Q of ``args.queries`` (Q queries about one video of ``minutes``, windows of
    ``window`` frames), with the encoder and decoder timed separately, queries/s, peak memory, and the FLOP floor."""
    import numpy as np
    import torch

    from rgnet.config import EvalConfig
    from rgnet.eval.inference import infer_video
    from rgnet.model import build_model
    from rgnet.model.fused import inference_model
    from rgnet.train.loop import autocast_context, resolve_device

    device = resolve_device(config.train.device)
    precision = config.train.precision
    torch.manual_seed(0)
    d = args.feature_dim
    model = build_model(config.model, d, d).to(device).eval()
    qs = sorted(set(args.queries))
    item = _inference_item(args, config.data.fps, minutes, window, qs[-1])
    ev = config.eval
    cfg = EvalConfig(top_k_windows=ev.top_k_windows, kernels=ev.kernels, window_chunk=ev.window_chunk)
    run = inference_model(model, cfg, device)  # what infer_video runs: the fused copy on a CPU (cached)
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

    run.encode = timed("encode", run.encode)  # type: ignore[method-assign]
    run.decode = timed("decode", run.decode)  # type: ignore[method-assign]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def infer(q: int) -> Any:
        sub = item if q == len(item.records) else _first_queries(item, q)
        with autocast_context(device, precision):
            return infer_video(model, sub, cfg, device)

    infer(1)  # warm-up: allocator, oneDNN kernels
    rows = []
    for q in qs:
        runs = []
        for _ in range(max(1, args.repeats) if q == 1 else 1):  # Q > 1: one run averages Q queries already
            timings.update(encode=0.0, decode=0.0)
            t0 = time.perf_counter()
            preds, _ = infer(q)
            _sync(device)
            runs.append((time.perf_counter() - t0, timings["encode"], timings["decode"]))
        total, enc_s, dec_s = (float(np.median([r[i] for r in runs])) for i in range(3))
        row: dict[str, Any] = {
            "queries": q,
            "runs": len(runs),
            "total_s": total,
            "latency_per_query_s": total / q,
            "queries_per_s": q / total,
            "encoder_s": enc_s,
            "decoder_s": dec_s,
            "total_runs_s": [r[0] for r in runs],
            "predictions": len(preds[0].predictions),
            "peak_rss_gib": _peak_rss_gib(),  # the child's high-water mark so far (Q ascending)
        }
        if device.type == "cuda":
            row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    # FLOPs (counted by torch on the eager model) and the time they need at the measured matmul peak: a floor no
    # implementation of this computation reaches on this machine
    del run.encode, run.decode
    with autocast_context(device, precision):
        flops = _count_flops(model, item, cfg, device)
    peak = bench_matmul_peak(device, precision, args.peak_seconds)
    for row in rows:
        q = row["queries"]
        per_query = flops["project"] / q + flops["encode"] + flops["decode"]
        row.update(
            flops_per_query=per_query,
            floor_per_query_s=per_query / peak["flops_per_s"],
            latency_over_floor=row["latency_per_query_s"] / (per_query / peak["flops_per_s"]),
        )
    return {
        "video_minutes": minutes,
        "window_frames": window,
        "frames": int(item.frames.shape[0]),
        "windows": len(item.bounds),
        "top_k": min(cfg.top_k_windows, len(item.bounds)),
        "window_chunk": cfg.window_chunk,
        "kernels": cfg.kernels if device.type == "cpu" else "eager",
        "flops": flops,
        "matmul_peak": peak,
        "by_queries": rows,
    }


def _first_queries(item: Any, q: int) -> Any:
    from dataclasses import replace

    return replace(item, records=item.records[:q], texts=item.texts[:q])


def _child(args: argparse.Namespace) -> int:
    import torch

    config = bench_config(args.preset, args.overrides)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    shape = sizes(args)
    result = (
        bench_train(shape, config) if args.part == "train" else bench_infer(shape, config, args.minutes, args.window)
    )
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


def data_parser() -> argparse.ArgumentParser:
    """``rgnet bench --data``: the options of :func:`pipelines.ray_data_bench.run_data_bench`."""
    from pipelines import ray_data_bench

    p = argparse.ArgumentParser(prog="rgnet bench --data", description=(ray_data_bench.__doc__ or "").split("\n\n")[0])
    p.add_argument("--data", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_data.json", help="JSON file for the results (default: %(default)s)")
    p.add_argument("--preset", default=None, help="dataset from this preset (default: the embedded default)")
    p.add_argument("--budget-mib", type=float, default=16.0, help="Ray Data object-store budget (default: 16)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch (default: 2)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/tmp/d")
    return p


def quality_parser() -> argparse.ArgumentParser:
    """``rgnet bench --quality``: the options of :func:`pipelines.quality_bench.run_quality_bench`."""
    from pipelines import quality_bench

    p = argparse.ArgumentParser(
        prog="rgnet bench --quality", description=(quality_bench.__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process (default: 1)")
    p.add_argument("--parallel", type=int, default=2, help="local runs at a time (default: 2)")
    p.add_argument("--out", default="runs/quality", help="folder for the runs and the table (default: %(default)s)")
    p.add_argument("--preset", default=None, help="config preset (default: the embedded default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both paths")
    return p


def _data_main(argv: list[str]) -> int:
    from pipelines.ray_data_bench import run_data_bench

    args = data_parser().parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = run_data_bench(
        preset=args.preset, overrides=args.overrides, budget_mib=args.budget_mib, epochs=args.epochs
    )
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


def _quality_main(args: argparse.Namespace) -> int:
    from pipelines.quality_bench import QualityOptions, run_quality_bench

    opts = QualityOptions(
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        threads=args.threads,
        parallel=args.parallel,
        out=args.out,
        preset=args.preset,
        overrides=tuple(args.overrides),
    )
    run_quality_bench(opts)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data" in argv:  # the Ray Data pipeline benchmark has its own options
        return run_guarded(_data_main, argv)
    if "--quality" in argv:  # local vs distributed training over seeds: its own options
        return run_guarded(_quality_main, quality_parser().parse_args(argv))
    args = build_parser().parse_args(argv)
    if args.part != "all":
        return _child(args)
    return run_guarded(_bench, args)


def _bench(args: argparse.Namespace) -> int:
    config = bench_config(args.preset, args.overrides)  # a bad key or value fails here, before any child
    common = [
        "--window-frames",
        str(args.window_frames),
        "--feature-dim",
        str(args.feature_dim),
        "--train-steps",
        str(args.train_steps),
        "--repeats",
        str(args.repeats),
        "--peak-seconds",
        str(args.peak_seconds),
        *(["--preset", args.preset] if args.preset else []),
        *args.overrides,  # before --queries, whose list would take them
        "--queries",
        *map(str, args.queries),
    ]
    results: dict[str, Any] = {
        "machine": machine_info(config),
    }
    if not args.no_train:
        print("training step ...", flush=True)
        tr = _run_child([*common, "--part", "train"])
        results["train"] = tr
        print(
            f"  train: {tr['window_pairs_per_s']:.2f} window-pairs/s, {tr['queries_per_s']:.2f} queries/s "
            f"({tr['step_seconds']:.2f} s/step, {tr['pairs_per_step']} pairs), peak RSS {tr['peak_rss_gib']:.2f} GiB, "
            f"{tr['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * tr['fraction_of_matmul_peak']:.1f}% of matmul "
            f"peak ({tr['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s)",
            flush=True,
        )
    results["inference"] = []
    for window in args.infer_windows:
        for minutes in args.video_minutes:
            print(f"inference: {minutes:g} min, W = {window} ...", flush=True)
            r = _run_child([*common, "--part", "infer", "--minutes", str(minutes), "--window", str(window)])
            results["inference"].append(r)
    results["machine"]["load_after"] = _load_average()
    print(inference_table(results["inference"], config.train.device, config.train.precision))
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(config: Config) -> dict[str, Any]:
    """What the numbers depend on: CPU model and count, torch, threads, device and precision, and the load average
    (1, 5, 15 min) when the benchmark started (other work on the machine slows every number down)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": config.train.threads or torch.get_num_threads(),
        "device": config.train.device,
        "precision": config.train.precision if config.train.device != "cpu" else "fp32",
        "load_before": _load_average(),
    }
    if config.train.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def inference_table(results: list[dict[str, Any]], device: str = "cpu", precision: str = "fp32") -> str:
    """The Markdown table of the inference rows: one per (window length, video length, Q)."""
    mem = "peak GPU memory" if device != "cpu" else "peak RSS"
    lines = [
        f"| W (frames) | video | windows | Q | latency / query | queries/s | {mem} | GFLOP / query "
        "| FLOP floor / query | latency / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["by_queries"]:
            gib = row.get("peak_cuda_gib", row["peak_rss_gib"])
            lines.append(
                f"| {r['window_frames']} | {r['video_minutes']:g} min | {r['windows']} | {row['queries']} "
                f"| {row['latency_per_query_s']:.3f} s | {row['queries_per_s']:.2f} | {gib:.2f} GiB "
                f"| {row['flops_per_query'] / 1e9:.1f} | {row['floor_per_query_s']:.3f} s "
                f"| {row['latency_over_floor']:.2f} |"
            )
    if results:
        peak = results[0]["matmul_peak"]
        parts = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak.items() if k != "flops_per_s")
        dtype = precision if device != "cpu" else "fp32"
        lines.append(f"\nFloor = FLOPs / matmul peak ({dtype}: {peak['flops_per_s'] / 1e9:.0f} GFLOP/s; {parts}).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
