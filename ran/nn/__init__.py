"""The networks: residual units (`units`), the Attention Module and its masks (`attention`), the one network
specification and its registered variants (`models`), and the registry (`registry`). Plain PyTorch: nothing
here imports Lightning."""

from ran.nn.attention import AttentionModule
from ran.nn.models import ResidualAttentionNet
from ran.nn.registry import create_model, list_models, model_entrypoint, register_model
from ran.nn.units import ATTENTIONS, LEARNINGS, MASKS, UNITS, PostActBottleneck, PreActBottleneck, UnitSpec

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
