"""RGNet model, Hungarian matcher and losses (plain PyTorch); the output schema is in ``rgnet.model.rgnet``."""

from rgnet.model.criterion import Criterion
from rgnet.model.matcher import HungarianMatcher
from rgnet.model.rgnet import DecoderOutput, EncoderOutput, RGNet, build_model, build_pairs

__all__ = ["Criterion", "DecoderOutput", "EncoderOutput", "HungarianMatcher", "RGNet", "build_model", "build_pairs"]
