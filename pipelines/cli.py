"""The ``rgnet`` console script: one sub-command per pipeline, each dispatching to that pipeline's ``main``.

There is one implementation per job: ``rgnet train ...`` and ``python -m pipelines.train ...`` (what ``ray job
submit`` runs) are the same code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("pipelines.prepare", "generate the synthetic dataset (any layout) or check a dataset on disk"),
    "train": ("pipelines.train", "train RGNet (distributed on Ray by default; --local for one process)"),
    "tune": ("pipelines.tune", "sweep a search space (tune_spaces/*.yaml) with Ray Tune + Optuna + ASHA"),
    "ablate": (
        "pipelines.ablate",
        "the ablation table: every variant of a space file trained locally over seeds, means, intervals, paired "
        "differences",
    ),
    "study": (
        "pipelines.study",
        "one of the paper's claims with error bars: tab3 | tab4 | topk | oracle | length | temperature",
    ),
    "evaluate": ("pipelines.evaluate", "metrics for a prediction file, or for a checkpoint on a split"),
    "predict": (
        "pipelines.predict",
        "top moments for a sentence in a long video; --split: batch inference over a split with Ray Data",
    ),
    "import": (
        "pipelines.import_released",
        "import weights from outside the project: `rgnet import released CKPT --out DIR` (the released RGNet files)",
    ),
    "bench": (
        "pipelines.bench",
        "training throughput, inference latency vs video length, memory, FLOP/s; --data: the Ray Data pipeline",
    ),
}

USAGE = (
    "usage: rgnet <command> [options]   (rgnet <command> --help for a command's options)\n\ncommands:\n"
    + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("rgnet: train, evaluate and benchmark RGNet for long-video temporal grounding.\n")
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        from rgnet import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"rgnet: unknown command '{name}'\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
