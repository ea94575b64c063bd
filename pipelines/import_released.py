"""``rgnet import released CKPT --out DIR``: a released RGNet checkpoint as a checkpoint of this project.

Thin: parses the arguments, calls :func:`rgnet.released.import_released` and :func:`rgnet.released.write_import`,
and prints what was mapped, what was dropped (and why) and the commands that use the result.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter

from pipelines.common import fail, run_command
from rgnet.released import PRESETS, ReleasedCheckpointError, ReleasedImport, import_released, write_import


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rgnet import",
        description="Import model weights from outside this project.",
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    r = sub.add_parser(
        "released",
        help="a checkpoint released with the RGNet code (github.com/Tanveer81/RGNet), MAD or Ego4D-NLQ",
        description="Convert a released RGNet checkpoint (read with torch.load(weights_only=True)) into DIR/"
        "checkpoint.pt and DIR/config.yaml: every tensor is mapped by name and shape, the model and window config "
        "come from the file's options on top of the preset, and model.compat=released reproduces the released "
        "code's numerics.",
    )
    r.add_argument("checkpoint", metavar="CKPT", help="the released .ckpt/.pth file")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for checkpoint.pt and config.yaml")
    r.add_argument(
        "--preset",
        choices=PRESETS,
        help="preset the derived config starts from (default: from the file's dset_name)",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _summary(result: ReleasedImport) -> str:
    cfg = result.config
    m = cfg.model
    mapped = result.mapped
    stacked = sum(len(r.targets) == 3 for r in mapped)
    lines = [
        f"imported {result.source} (released epoch {result.released_epoch}) with preset {result.preset}:",
        f"  {len(mapped)} released tensors mapped to {len(result.state_dict)} model tensors "
        f"({stacked} stacked q/k/v in-projections split in three)",
        f"  {len(result.dropped)} dropped in whole or in part, none of which can change an output:",
    ]
    reasons = Counter(r.reason for r in result.dropped)
    for reason, count in reasons.items():
        names = [r.label for r in result.dropped if r.reason == reason]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"    {count} x {shown}\n      ({reason})")
    lines.append(
        f"  model: D {m.hidden_dim}, {m.num_heads} heads, FFN {m.ffn_dim}, {m.cross_layers} cross + "
        f"{m.retrieval_layers} retrieval + {m.decoder_layers} decoder layers, {m.num_queries} queries, Gumbel tau "
        f"{m.sampler.temperature:g}, positions T {m.pos_temperature:g}, model.compat={m.compat}"
    )
    lines.append(
        f"  data: video {cfg.data.video_dim}-d, text {cfg.data.text_dim}-d (raw tokens, at most "
        f"{cfg.data.max_query_tokens}), {cfg.data.fps:g} fps; windows {cfg.windows.length_sec:g} s; "
        f"top-{cfg.eval.top_k_windows} windows at inference"
    )
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    try:
        result = import_released(args.checkpoint, args.preset)
    except ReleasedCheckpointError as e:
        return fail(str(e))
    ckpt, config = write_import(result, args.out)
    print(_summary(result))
    c, f = shlex.quote(str(ckpt)), shlex.quote(str(config))
    root = result.config.data.root
    print(
        f"\nwrote {ckpt} and {config}\nnext:\n"
        f"  rgnet evaluate --checkpoint {c} --split test data.root={shlex.quote(root)}   "
        "# data.root: where the dataset is\n"
        f"  rgnet predict --checkpoint {c} --video FEATURES.h5:KEY --query-features TOKENS.h5:KEY\n"
        f"  rgnet train --config {f} train.init_from={c} [key=value ...]   # fine-tune (--local: one process)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
