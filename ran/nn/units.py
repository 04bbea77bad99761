"""Residual units of Residual Attention Networks (Wang et al., CVPR 2017) and the switches of every network.

Section numbers refer to the paper (arXiv 1704.06904). Layer-level details that the paper leaves open
follow the authors' released Caffe model definitions (fwang91/residual-attention-network).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

# The switches of every network and of `AttentionModule`: each set of values is defined here once; the tuples
# are derived from the types, which the command line uses to reject a bad value at parse time.
Learning = Literal["arl", "nal"]
Attention = Literal["mixed", "channel", "spatial"]
Mask = Literal["hourglass", "local", "cbam", "cbam_channel", "cbam_spatial", "se", "none"]
Unit = Literal["preact", "postact"]
LEARNINGS: tuple[str, ...] = get_args(Learning)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
MASKS: tuple[str, ...] = get_args(Mask)
UNITS: tuple[str, ...] = get_args(Unit)


def check_choice(kind: str, value: str, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise a ValueError that lists them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(repr(c) for c in choices)}")
    return value


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck residual unit (He et al., 2016), as used throughout the paper (Sec. 4).

    BN-ReLU-1x1, BN-ReLU-3x3 (carries the stride; grouped for ResNeXt units), BN-ReLU-1x1. Where the shape
    changes, a 1x1 projection shortcut is applied to the pre-activated input, as in the released model files.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        mid_channels: int | None = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        mid = mid_channels or out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLUs on the BN outputs: BN's backward needs its input, not its output, so nothing saved
        # for backward is overwritten, and each unit allocates and writes three tensors fewer.
        a = F.relu(self.bn1(x), inplace=True)
        shortcut = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        return out + shortcut


class PostActBottleneck(nn.Module):
    """Post-activation bottleneck residual unit (He et al., 2015; grouped, it is ResNeXt's unit), as in the
    released AttentionNeXt-56-deploy.prototxt.

    1x1 conv-BN-ReLU, 3x3 conv (carries the stride; grouped for ResNeXt units)-BN-ReLU, 1x1 conv-BN; where the
    shape changes, a 1x1 conv-BN projection shortcut; a ReLU after the sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        mid_channels: int | None = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        mid = mid_channels or out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut, inplace=True)


@dataclass(frozen=True)
class UnitSpec:
    """The residual unit of a network; calling it with (in_channels, out_channels, stride) builds one.

    `unit`: 'preact' (`PreActBottleneck`, the released Attention-56/92) or 'postact' (`PostActBottleneck`, the
    released AttentionNeXt-56); the bottleneck width is `bottleneck_ratio` of the output channels; `groups`
    groups the 3x3 conv (32 with ratio 1/2 for ResNeXt units).
    """

    unit: Unit = "preact"
    bottleneck_ratio: float = 0.25
    groups: int = 1

    def __post_init__(self) -> None:
        check_choice("unit", self.unit, UNITS)

    @property
    def post_activation(self) -> bool:
        """Whether a unit's output has passed its last ReLU, so what reads it (a mask head, the classifier)
        needs no BN-ReLU of its own, while a pre-activation unit's output still does."""
        return self.unit == "postact"

    def __call__(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        block = PostActBottleneck if self.post_activation else PreActBottleneck
        return block(
            in_channels,
            out_channels,
            stride,
            mid_channels=int(out_channels * self.bottleneck_ratio),
            groups=self.groups,
        )


def stack_units(make_unit: UnitSpec, channels: int, n: int) -> nn.Sequential:
    """`n` shape-preserving residual units (an empty Sequential, the identity, when n = 0)."""
    return nn.Sequential(*(make_unit(channels, channels, 1) for _ in range(n)))
