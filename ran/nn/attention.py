"""The Attention Module of Residual Attention Networks (Wang et al., CVPR 2017, Sec. 3): trunk branch, soft
mask branch (bottom-up top-down hourglass, the local-convolution ablation, CBAM and SE for comparison), the
mask activations of Sec. 3.3, and attention residual learning (Eq. 3) vs naive attention learning (Eq. 1).

Layer-level details that the paper leaves open follow the authors' released Caffe model definitions
(fwang91/residual-attention-network).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ran.nn.units import (
    ATTENTIONS,
    LEARNINGS,
    MASKS,
    Attention,
    Learning,
    Mask,
    UnitSpec,
    check_choice,
    stack_units,
)

# --- Mask activations (Sec. 3.3) ---------------------------------------------------------------------------


class MixedAttention(nn.Module):
    """f1: sigmoid at every channel and spatial position (Sec. 3.3, Eq. 5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class ChannelAttention(nn.Module):
    """f2: x_{i,c} / ||x_i||, L2 normalisation across the channels at each position i (Sec. 3.3, Eq. 6).

    `eps` bounds the norm from below, so an all-zero position maps to zeros instead of NaN.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1, eps=self.eps)


class SpatialAttention(nn.Module):
    """f3: sigmoid((x_{i,c} - mean_c) / std_c), mean and std over channel c's positions (Sec. 3.3, Eq. 7).

    Statistics are per sample and per channel; `eps` is added to the variance, so a constant map gives 0.5.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))


def make_activation(attention: Attention) -> nn.Module:
    check_choice("attention", attention, ATTENTIONS)
    return {"mixed": MixedAttention, "channel": ChannelAttention, "spatial": SpatialAttention}[attention]()


# --- Soft mask branches -----------------------------------------------------------------------------------
# Every mask branch maps (x, trunk) -> M, a tensor that broadcasts against the trunk output T: x is the
# module's input after its p pre-processing units, the input of the paper's mask branch; the CBAM and SE
# gates are computed from the features they refine, the trunk output, as in their own papers.


class MaskHead(nn.Sequential):
    """The end of the soft mask branch: BN-ReLU-1x1 conv, BN-ReLU-1x1 conv, then the activation (Sec. 3.2).

    With `preactivate=False`, after post-activation units, the first BN-ReLU is left out: 1x1 conv-BN-ReLU-1x1
    conv, then the activation, as in the released AttentionNeXt-56 file.
    """

    def __init__(self, channels: int, attention: Attention, *, preactivate: bool = True) -> None:
        pre = [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)] if preactivate else []
        super().__init__(
            *pre,
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            make_activation(attention),
        )


class HourglassMask(nn.Module):
    """Bottom-up top-down soft mask branch (Sec. 3.2, Fig. 3).

    Down: `pool_levels` times a 3x3/2 max-pooling followed by `r` residual units (`bottom_units` at the
    lowest resolution), with one skip-connection unit per level except the deepest. Up: bilinear up-sampling
    to the exact size of the matching down-path tensor, plus that level's skip, then `r` units; a last
    up-sampling back to the input size. Nothing but the skip is added to an up-sampled tensor (in the
    released Caffe files the interpolation's second input only gives the output size).
    """

    def __init__(
        self,
        channels: int,
        make_unit: UnitSpec,
        *,
        r: int,
        pool_levels: int,
        bottom_units: int,
        attention: Attention,
    ) -> None:
        super().__init__()
        if pool_levels < 1:
            raise ValueError(
                f"an hourglass mask needs pool_levels >= 1, got {pool_levels}; "
                "use mask='local' for a mask without pooling"
            )
        self.pool_levels = pool_levels
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.down = nn.ModuleList(
            stack_units(make_unit, channels, bottom_units if level == pool_levels - 1 else r)
            for level in range(pool_levels)
        )
        self.skips = nn.ModuleList(make_unit(channels, channels, 1) for _ in range(pool_levels - 1))
        self.up = nn.ModuleList(stack_units(make_unit, channels, r) for _ in range(pool_levels - 1))
        self.head = MaskHead(channels, attention, preactivate=not make_unit.post_activation)

    @property
    def min_input_size(self) -> int:
        """The smallest height and width this branch accepts: one pixel at the lowest resolution."""
        return 2**self.pool_levels

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"feature map {h}x{w} is too small for a soft mask with {self.pool_levels} pooling levels: "
                f"it needs at least {self.min_input_size}x{self.min_input_size} here; "
                "use a larger input image or fewer pooling levels (pool_levels)"
            )
        skips, sizes, out = [], [], x
        for level, units in enumerate(self.down):
            out = units(self.pool(out))
            if level < self.pool_levels - 1:
                skips.append(self.skips[level](out))
                sizes.append(out.shape[-2:])
        for level in reversed(range(self.pool_levels - 1)):
            out = F.interpolate(out, size=sizes[level], mode="bilinear", align_corners=True) + skips[level]
            out = self.up[level](out)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return self.head(out)


class LocalMask(nn.Module):
    """The paper's local-convolution ablation (Sec. 4.1, Table 2): the hourglass branch's residual units
    applied at full resolution, with no pooling, up-sampling or skip connections, then the same head."""

    def __init__(self, channels: int, make_unit: UnitSpec, *, num_units: int, attention: Attention) -> None:
        super().__init__()
        self.units = stack_units(make_unit, channels, num_units)
        self.head = MaskHead(channels, attention, preactivate=not make_unit.post_activation)

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(x))


def _mlp(channels: int, reduction: int) -> nn.Sequential:
    hidden = max(channels // reduction, 1)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
    )


class CBAMChannelGate(nn.Module):
    """CBAM channel attention (Woo et al., ECCV 2018): avg- and max-pooled descriptors through a shared
    MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = _mlp(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + mx)


class CBAMSpatialGate(nn.Module):
    """CBAM spatial attention: the channel-wise max and mean maps, stacked in that order, through a 7x7 conv,
    BatchNorm (momentum 0.01) and a sigmoid, as in CBAM's official code (Jongchan/attention-module,
    MODELS/cbam.py: ChannelPool, BasicConv), so its weights load unchanged."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class CBAMMask(nn.Module):
    """CBAM as a soft mask: channel gate, then spatial gate on the channel-refined features; M = Mc * Ms, so
    that M * T is exactly CBAM's output. Either gate can be left out for the channel-only and spatial-only
    variants."""

    def __init__(
        self, channels: int, *, channel: bool = True, spatial: bool = True, reduction: int = 16
    ) -> None:
        super().__init__()
        self.channel_gate = CBAMChannelGate(channels, reduction) if channel else None
        self.spatial_gate = CBAMSpatialGate() if spatial else None

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        if self.channel_gate is None:
            return self.spatial_gate(trunk)
        mc = self.channel_gate(trunk)
        if self.spatial_gate is None:
            return mc
        return mc * self.spatial_gate(trunk * mc)


class SEMask(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018) as a soft mask: global average pool, MLP, sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = _mlp(channels, reduction)

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(trunk, 1)))


def hourglass_unit_count(r: int, pool_levels: int, bottom_units: int) -> int:
    """Residual units in an hourglass mask: r per level down and up, `bottom_units` at the bottom, and the
    skip units."""
    return r * (pool_levels - 1) + bottom_units + (pool_levels - 1) + r * (pool_levels - 1)


def make_mask(
    mask: Mask,
    channels: int,
    make_unit: UnitSpec,
    *,
    r: int,
    pool_levels: int,
    bottom_units: int,
    attention: Attention,
) -> nn.Module | None:
    """Build the soft mask branch named by `mask` (None for 'none', the trunk-only baseline).

    `attention` is checked by `make_activation` for the paper's masks; every other mask takes 'mixed' only.
    """
    check_choice("mask", mask, MASKS)
    if mask not in ("hourglass", "local") and attention != "mixed":
        raise ValueError(
            f"attention={attention!r} applies to the paper's masks ('hourglass', 'local') only; "
            f"mask={mask!r} has its own sigmoid gates: use attention='mixed' with it"
        )
    if mask == "hourglass":
        return HourglassMask(
            channels, make_unit, r=r, pool_levels=pool_levels, bottom_units=bottom_units, attention=attention
        )
    if mask == "local":
        return LocalMask(
            channels,
            make_unit,
            num_units=hourglass_unit_count(r, pool_levels, bottom_units),
            attention=attention,
        )
    if mask == "se":
        return SEMask(channels)
    if mask == "none":
        return None
    return CBAMMask(channels, channel=mask != "cbam_spatial", spatial=mask != "cbam_channel")


class AttentionModule(nn.Module):
    """Attention Module (Sec. 3, Fig. 2): `p` units, then a trunk branch T of `t` units beside a soft mask
    branch M, combined by attention residual learning H = (1 + M) * T (Eq. 3, `learning='arl'`) or naive
    attention learning H = M * T (Eq. 1, `learning='nal'`), then `p` units.

    `mask_out` is an identity placed on M: hooks on it read (or, in tests, replace) the soft mask.
    """

    def __init__(
        self,
        channels: int,
        *,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        pool_levels: int = 1,
        bottom_units: int | None = None,
        learning: Learning = "arl",
        attention: Attention = "mixed",
        mask: Mask = "hourglass",
        make_unit: UnitSpec | None = None,
    ) -> None:
        super().__init__()
        self.learning = check_choice("learning", learning, LEARNINGS)
        make_unit = make_unit or UnitSpec()
        self.pre = stack_units(make_unit, channels, p)
        self.trunk = stack_units(make_unit, channels, t)
        self.mask = make_mask(
            mask,
            channels,
            make_unit,
            r=r,
            pool_levels=pool_levels,
            bottom_units=2 * r if bottom_units is None else bottom_units,
            attention=attention,
        )
        self.mask_out = nn.Identity()
        self.post = stack_units(make_unit, channels, p)

    @property
    def min_input_size(self) -> int:
        return getattr(self.mask, "min_input_size", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        if self.mask is not None:
            m = self.mask_out(self.mask(x, trunk))
            trunk = trunk + trunk * m if self.learning == "arl" else trunk * m
        return self.post(trunk)
