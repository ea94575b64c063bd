"""``rgnet prepare``: generate the synthetic dataset in any layout, or check a dataset on disk.

    rgnet prepare synthetic --preset synthetic-mad data.root=data/synthetic-mad
    rgnet prepare check --preset tiny data.root=/tmp/tiny

``synthetic`` prints what it wrote (videos, queries, frames, files and sizes) and how far the frozen-feature
baseline gets on it (retrieval Recall@K of max-frame-cosine window ranking, next to a random order): the
generator is meant to make that baseline weakly informative only.  ``check`` opens every split with the strict
readers and prints counts; bad data exits with code 2 and a message naming file, record and field.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.common import add_config_args, config_from_args, remove_flags, run_guarded
from rgnet.config import available_presets, load_config


def synthetic_presets() -> list[str]:
    """Presets whose data folder may be generated (real-data presets set data.generate_if_missing=false)."""
    return [p for p in available_presets() if load_config(p).data.generate_if_missing]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet prepare",
        description="Generate the seeded planted-moment synthetic dataset, or validate a dataset on disk.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{synthetic,check}")

    s = sub.add_parser(
        "synthetic",
        help="generate the synthetic dataset in the mad, ego4d or native layout",
        description="Generate the synthetic dataset (same seed -> byte-identical files) and report the frozen-"
        "feature retrieval diagnostic.",
    )
    s.add_argument(
        "--preset",
        default="synthetic-ego4d",
        choices=synthetic_presets(),
        help="preset whose data section is used: data.root (where), data.layout (mad, ego4d or native), data.synthetic "
        "(the generator's knobs) (default: synthetic-ego4d)",
    )
    s.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="config overrides, e.g. data.synthetic.num_train_videos=4",
    )
    remove_flags(
        s,
        {
            "--set": "give the overrides as positional key=value (e.g. data.synthetic.num_train_videos=4)",
            "--layout": "give data.layout=mad|ego4d|native (the layout the readers read is the one written)",
            "--out": "give data.root=DIR",
            "--seed": "give data.synthetic.seed=N",
            "--window-sec": "give windows.length_sec=S (the frozen retrieval diagnostic uses the training windows)",
        },
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar while generating")

    c = sub.add_parser(
        "check",
        help="open every split of a dataset with the strict readers and print counts",
        description="Validate a dataset: exits with code 2 and a message naming file, record and field on bad data.",
    )
    add_config_args(c)
    return p


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


def run_synthetic(args: argparse.Namespace) -> int:
    from rgnet.data.formats import DEFAULT_FPS
    from rgnet.data.synthetic import SPLITS, frozen_retrieval_recall, make_synthetic, write_synthetic

    cfg = load_config(args.preset, None, args.overrides)
    syn, out, layout = cfg.data.synthetic, Path(cfg.data.root), cfg.data.layout
    started = time.perf_counter()
    data = make_synthetic(syn, progress=not args.no_progress)
    generated = time.perf_counter()
    write_synthetic(syn, out, layout, data=data)
    written = time.perf_counter()

    print(f"wrote the synthetic dataset (preset {args.preset}, layout {layout}, seed {syn.seed}) to {out}")
    print(f"  generation {generated - started:.1f} s, writing {written - generated:.1f} s")
    print(f"  fps {data.fps:g}; video features (T, {syn.video_dim}), text tokens (L, {syn.text_dim}) float32")
    for split in SPLITS:
        records = data.splits[split]
        videos = sorted({r.video_key for r in records})
        frames = [len(data.videos[v]) for v in videos]
        moments = [r.end_sec - r.start_sec for r in records]
        if not records:
            print(f"  {split:<5}: empty")
            continue
        print(
            f"  {split:<5}: {len(videos)} videos, {len(records)} queries, {sum(frames)} frames "
            f"({min(frames)}-{max(frames)} per video = {min(frames) / data.fps:.0f}-{max(frames) / data.fps:.0f} s), "
            f"moment mean {sum(moments) / len(moments):.1f} s"
        )
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for path in files:
        print(f"  {path.relative_to(out).as_posix():<48} {_human(path.stat().st_size):>10}")
    print(f"  total on disk: {_human(sum(p.stat().st_size for p in files))}")

    window_sec = cfg.windows.length_sec
    print(f"frozen-feature retrieval (max frame cosine with the sentence feature, {window_sec:g} s windows):")
    for split in SPLITS:
        if not data.splits[split]:
            continue
        r: dict[str, Any] = frozen_retrieval_recall(data, split, window_sec, (1, 5))
        print(
            f"  {split:<5}: R@1 {r['R@1']:.3f} (random {r['random_R@1']:.3f}), R@5 {r['R@5']:.3f} "
            f"(random {r['random_R@5']:.3f}), {r['windows_per_video']:.1f} windows per query's video"
        )
    preset_data = load_config(args.preset).data
    if syn.layout != preset_data.layout or args.out:
        hint = f"--preset {args.preset} data.layout={syn.layout} data.root={out}"
        if DEFAULT_FPS.get(syn.layout, syn.fps) != syn.fps and not preset_data.fps:
            hint += f" data.fps={syn.fps:g}"  # the layout's reader would otherwise assume its official rate
        print(f"to use it: {hint}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from rgnet.data.dataset import open_split

    cfg = config_from_args(args)
    d = cfg.data
    print(f"checking {d.layout} dataset at {d.root}")
    for split in dict.fromkeys((d.train_split, d.val_split, d.test_split)):
        data = open_split(d, split)
        records = data.records
        videos = {r.video_key for r in records}
        frames = sum(data.num_frames(v) for v in videos)
        print(f"  {split:<5}: {len(records)} queries, {len(videos)} videos, {frames} frames at {data.fps:g} fps")
    print("ok")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn = run_synthetic if args.command == "synthetic" else run_check
    return run_guarded(fn, args)


if __name__ == "__main__":
    sys.exit(main())
