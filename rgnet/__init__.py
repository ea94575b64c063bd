"""RGNet: a unified retrieval and grounding network for long-video temporal grounding (plain PyTorch)."""

__version__ = "0.1.0"
