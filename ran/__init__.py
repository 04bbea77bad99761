"""Residual Attention Networks (Wang et al., CVPR 2017) for PyTorch and PyTorch Lightning.

`ran.nn`: the networks (plain PyTorch); `ran.train`: training them with Lightning; `ran.tools`: measurement,
summaries, pictures; `ran.cli`: the `ran` command. The networks' API is re-exported here.
"""

from ran.nn import (
    ATTENTIONS,
    LEARNINGS,
    MASKS,
    UNITS,
    AttentionModule,
    PostActBottleneck,
    PreActBottleneck,
    PretrainedWeightsError,
    ResidualAttentionNet,
    UnitSpec,
    WeightsDownloadError,
    create_model,
    list_models,
    list_pretrained,
    load_pretrained,
    model_entrypoint,
    register_model,
)

__version__ = "0.1.0"

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
