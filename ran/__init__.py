"""Residual Attention Networks (Wang et al., CVPR 2017) for PyTorch and PyTorch Lightning."""

from ran.layers import (
    ATTENTIONS,
    LEARNINGS,
    MASKS,
    UNITS,
    AttentionModule,
    PostActBottleneck,
    PreActBottleneck,
    UnitSpec,
)
from ran.models import ResidualAttentionNet
from ran.registry import create_model, list_models, model_entrypoint, register_model

__version__ = "0.1.0"

__all__ = [
    "ATTENTIONS",
    "LEARNINGS",
    "MASKS",
    "UNITS",
    "AttentionModule",
    "PostActBottleneck",
    "PreActBottleneck",
    "ResidualAttentionNet",
    "UnitSpec",
    "create_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]
