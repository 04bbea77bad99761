"""The networks: residual units (`units`), the Attention Module and its masks (`attention`), the one network
specification and its registered variants (`models`), the registry (`registry`) and trained weights as files
(`pretrained`). Plain PyTorch: nothing here imports Lightning."""

from ran.nn.attention import AttentionModule
from ran.nn.models import ResidualAttentionNet
from ran.nn.pretrained import PretrainedWeightsError, WeightsDownloadError, list_pretrained
from ran.nn.registry import create_model, list_models, load_pretrained, model_entrypoint, register_model
from ran.nn.units import ATTENTIONS, LEARNINGS, MASKS, UNITS, PostActBottleneck, PreActBottleneck, UnitSpec

__all__ = [
    "ATTENTIONS",
    "LEARNINGS",
    "MASKS",
    "UNITS",
    "AttentionModule",
    "PostActBottleneck",
    "PreActBottleneck",
    "PretrainedWeightsError",
    "ResidualAttentionNet",
    "UnitSpec",
    "WeightsDownloadError",
    "create_model",
    "list_models",
    "list_pretrained",
    "load_pretrained",
    "model_entrypoint",
    "register_model",
]
