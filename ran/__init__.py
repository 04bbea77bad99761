"""Residual Attention Networks (Wang et al., CVPR 2017) for PyTorch and PyTorch Lightning.

`ran.nn`: the networks (plain PyTorch); `ran.train`: training them with Lightning; `ran.tools`: measurement,
summaries, pictures; `ran.cli`: the `ran` command. The networks' API is re-exported here.
"""

from ran import nn
from ran.nn import *  # noqa: F403  (the networks' API: ran.create_model, ran.list_models, ...)

__version__ = "0.1.0"

__all__ = list(nn.__all__)
