"""Residual Attention Networks and the pre-activation ResNet baselines, built from one specification.

Every registered variant is a small function that states only its numbers; `ResidualAttentionNet` builds
them all. Three stages, each a stride-carrying transition unit followed by `modules_per_stage[i]` Attention
Modules (or plain residual units for the ResNet baselines), then optional final units, BN-ReLU (for
pre-activation units), global average pooling and a linear classifier (Sec. 4, Table 1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

import ran.nn.pretrained as pretrained
from ran.nn.attention import AttentionModule
from ran.nn.registry import register_model
from ran.nn.units import Attention, Learning, Mask, Unit, UnitSpec, check_choice

Stem = Literal["imagenet", "cifar"]
STEMS: tuple[str, ...] = get_args(Stem)


class ResidualAttentionNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="ran",
    license="mit",
    pipeline_tag="image-classification",
    tags=["residual-attention-network"],
    repo_url=pretrained.REPO_URL,
    paper_url=pretrained.PAPER_URL,
    model_card_template=pretrained.MODEL_CARD,
):
    """A Residual Attention Network (or, with `modules_per_stage` all 0, a pre-activation ResNet).

    Trained weights (`ran.nn.pretrained`): `save_pretrained(folder)` writes them as model.safetensors and
    config.json, `from_pretrained(folder or Hub repository)` rebuilds the network from them, `push_to_hub`
    uploads them (huggingface_hub's `PyTorchModelHubMixin`, whose config is the network's own: its registry
    name `arch`, its arguments and `pretrained_cfg`, the facts of its weights).

    Args:
        num_classes: classifier outputs.
        stem: 'imagenet' (7x7/2 conv, BN-ReLU, 3x3/2 max-pool) or 'cifar' (one 3x3 conv, followed by BN-ReLU
            for post-activation units, which expect an activated input as the ImageNet stem gives them).
        stem_width: output channels of the stem conv.
        stage_widths: output channels of the three stages (bottleneck width: `bottleneck_ratio` of it).
        stage_strides: stride of each stage's transition unit.
        modules_per_stage: Attention Modules per stage (m in depth = 36m + 20 when all are m).
        units_per_stage: extra plain residual units per stage after the modules (ResNet baselines).
        pool_levels: max-pooling levels of each stage's soft mask.
        final_units, final_width, final_stride: the units after the last stage (the 7x7 stage on ImageNet).
        p, t, r: units before/after the split, in the trunk, and per mask level (Sec. 3.2).
        bottom_units: mask units at its lowest resolution (default 2r, as in the released models).
        learning: 'arl' H = (1 + M) * T, or 'nal' H = M * T.
        attention: 'mixed', 'channel' or 'spatial' (the mask's activation, Sec. 3.3).
        mask: 'hourglass', 'local', 'cbam', 'cbam_channel', 'cbam_spatial', 'se' or 'none'.
        unit: 'preact' (pre-activation bottleneck units, as in the released Attention-56/92) or 'postact'
            (post-activation units, as in the released AttentionNeXt-56: the mask heads start with their
            conv and no BN-ReLU precedes the average pooling); see `ran.nn.units.UnitSpec`.
        groups, bottleneck_ratio: the 3x3 conv's groups and the bottleneck width over the output width
            (ResNeXt units: groups=32, ratio 1/2 for AttentionNeXt).
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        default_input_size: the input size the variant is meant for (summary, benchmarks).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        stem: Stem = "imagenet",
        stem_width: int = 64,
        stage_widths: Sequence[int] = (256, 512, 1024),
        stage_strides: Sequence[int] = (1, 2, 2),
        modules_per_stage: Sequence[int] = (1, 1, 1),
        units_per_stage: Sequence[int] = (0, 0, 0),
        pool_levels: Sequence[int] = (3, 2, 1),
        final_units: int = 3,
        final_width: int = 2048,
        final_stride: int = 2,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        bottom_units: int | None = None,
        learning: Learning = "arl",
        attention: Attention = "mixed",
        mask: Mask = "hourglass",
        unit: Unit = "preact",
        groups: int = 1,
        bottleneck_ratio: float = 0.25,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        default_input_size: int = 224,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        for name, values in (
            ("stage_widths", stage_widths),
            ("stage_strides", stage_strides),
            ("modules_per_stage", modules_per_stage),
            ("units_per_stage", units_per_stage),
            ("pool_levels", pool_levels),
        ):
            if len(values) != 3:
                raise ValueError(f"{name} must give one value per stage (3 values), got {tuple(values)}")
        if any(m < 0 for m in modules_per_stage):
            raise ValueError(f"modules_per_stage must be >= 0, got {tuple(modules_per_stage)}")
        self.num_classes = num_classes
        self.default_input_size = default_input_size
        self.drop_rate = drop_rate

        make_unit = UnitSpec(unit, bottleneck_ratio, groups)
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            self.stem_stride = 4
        else:
            conv = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
            self.stem = (
                nn.Sequential(conv, nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
                if make_unit.post_activation
                else conv
            )
            self.stem_stride = 1

        stages, channels = [], stem_width
        module = partial(
            AttentionModule,
            p=p,
            t=t,
            r=r,
            bottom_units=bottom_units,
            learning=learning,
            attention=attention,
            mask=mask,
            make_unit=make_unit,
        )
        for width, stride, m, extra, levels in zip(
            stage_widths, stage_strides, modules_per_stage, units_per_stage, pool_levels
        ):
            blocks = [make_unit(channels, width, stride)]
            blocks += [module(width, pool_levels=levels) for _ in range(m)]
            blocks += [make_unit(width, width, 1) for _ in range(extra)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        if final_units:
            final = [make_unit(channels, final_width, final_stride)]
            final += [make_unit(final_width, final_width, 1) for _ in range(final_units - 1)]
            stages.append(nn.Sequential(*final))
            channels = final_width
        self.stages = nn.Sequential(OrderedDict((f"stage{i + 1}", s) for i, s in enumerate(stages)))
        # Pre-activation units leave their output un-normalised; post-activation units end with a ReLU.
        self.norm = (
            nn.Identity()
            if make_unit.post_activation
            else nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        )
        self.num_features = channels
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()
        self.arch: str | None = None  # the registry name, set by the registered variant that built it
        # The facts of the weights (input size, mean/std, dataset, metrics, provenance), as in config.json.
        self.pretrained_cfg: dict = {"input_size": [in_chans, default_input_size, default_input_size]}

    def _init_weights(self) -> None:
        """Kaiming-normal (fan-out, ReLU) convolutions, BN weight 1 and bias 0, zero conv biases; linear
        layers
        (classifier, CBAM/SE MLPs are 1x1 convs and follow the conv rule) keep PyTorch's default init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def attention_modules(self) -> OrderedDict[str, AttentionModule]:
        """Every Attention Module, by its qualified name (e.g. 'stages.stage2.1')."""
        return OrderedDict((n, m) for n, m in self.named_modules() if isinstance(m, AttentionModule))

    @property
    def min_input_size(self) -> int:
        """The smallest input height/width every soft mask can pool down to one pixel."""
        size, stride = 1, self.stem_stride
        for stage in self.stages:
            stride *= stage[0].conv2.stride[0]
            for block in stage:
                if isinstance(block, AttentionModule):
                    size = max(size, block.min_input_size * stride)
        return size

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError if `x` is too small for the soft masks' pooling levels."""
        size = self.min_input_size
        if min(x.shape[-2:]) < size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small for this network's soft masks: "
                f"height and width must be at least {size} (use larger images, or fewer "
                "pool_levels)"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature maps before pooling, (B, num_features, H / feature_stride, W / feature_stride):
        the network as a backbone (timm's `forward_features`)."""
        self.check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, dropout and the classifier on `forward_features`' maps: logits
        (B, num_classes), or with `pre_logits` the pooled features (B, num_features) (timm's
        `forward_head`)."""
        x = F.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    @property
    def feature_stride(self) -> int:
        """How many input pixels one pixel of `forward_features`' maps spans (4 x 8 = 32 on ImageNet, 4 on
        CIFAR)."""
        stride = self.stem_stride
        for stage in self.stages:
            stride *= stage[0].conv2.stride[0]
        return stride

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` classes."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes).to(self.fc.weight.device)

    # --- trained weights (ran.nn.pretrained) ----------------------------------------------------------------

    def network_config(self) -> dict:
        """What rebuilds this network: its registry name, `num_classes` and every other argument."""
        kwargs = {k: v for k, v in (self._hub_mixin_config or {}).items() if k != "num_classes"}
        return {"arch": self.arch, "num_classes": self.num_classes, "model_kwargs": kwargs}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, map_location="cpu", **kwargs):
        """The network of a folder of weights, a Hugging Face Hub repository ('owner/name'), a URL or a
        published entry, in eval mode; keyword arguments: huggingface_hub's download options (revision,
        cache_dir, token, force_download, local_files_only), then overrides of config.json's arguments."""
        hub = {k: kwargs.pop(k) for k in pretrained.HUB_OPTIONS if k in kwargs}
        source = pretrained.hub_source(pretrained_model_name_or_path)
        return pretrained.load(source, lambda _arch: cls, None, kwargs, map_location, **hub)

    def save_pretrained(self, save_directory, *, config=None, **kwargs):
        """model.safetensors, config.json (the network and `pretrained_cfg`) and a model card in
        `save_directory`; other keyword arguments as huggingface_hub's (push_to_hub, repo_id, ...)."""
        if config is not None:
            raise TypeError("config.json is the network's own: set model.pretrained_cfg instead of config=")
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        pretrained.write_folder(self, Path(save_directory))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return super().generate_model_card(*args, **{**pretrained.card_fields(self), **kwargs})

    @torch.no_grad()
    def soft_masks(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Run `x` through the network and return every Attention Module's soft mask M(x), by module name.

        Hourglass and local masks have the trunk's shape (B, C, H, W); CBAM and SE masks broadcast against
        it ((B, C, 1, 1) or (B, 1, H, W)). Modules with mask='none' have none. For visualisation, e.g.
        `masks['stages.stage1.1'].mean(1)` gives one heat map per image.
        """
        masks: OrderedDict[str, torch.Tensor] = OrderedDict()
        handles = [
            m.mask_out.register_forward_hook(lambda _m, _i, out, name=name: masks.__setitem__(name, out))
            for name, m in self.attention_modules.items()
            if m.mask is not None
        ]
        try:
            self(x)
        finally:
            for h in handles:
                h.remove()
        return masks

    def stage_shapes(self, x: torch.Tensor) -> OrderedDict[str, tuple[int, ...]]:
        """The output shape of the stem and of every stage for input `x`."""
        self.check_input(x)
        shapes = OrderedDict()
        with torch.no_grad():
            x = self.stem(x)
            shapes["stem"] = tuple(x.shape)
            for name, stage in self.stages.named_children():
                x = stage(x)
                shapes[name] = tuple(x.shape)
        return shapes


# --- Registered variants ------------------------------------------------------------------------------------


def _imagenet(variant: dict, **kwargs) -> ResidualAttentionNet:
    """ImageNet layout (Table 2): 7x7/2 conv and max-pool to 56x56; stages of 256/512/1024 channels at
    56/28/14 with 3/2/1 mask pooling levels (lowest mask resolution 7x7); three 2048-channel units at 7x7."""
    return ResidualAttentionNet(**{"num_classes": 1000, **variant, **kwargs})


def _cifar(variant: dict, **kwargs) -> ResidualAttentionNet:
    """CIFAR layout (32x32 input). The paper does not give it, so these choices are ours: a 3x3 conv stem of
    16
    channels; the stage widths of pre-activation ResNet-164 (outputs 64/128/256 at 32x32/16x16/8x8, bottleneck
    a quarter of that); m Attention Modules in every stage; mask pooling levels 3/2/1, so that every stage's
    mask reaches 4x4 as ImageNet's reach 7x7; and the ImageNet layout's three final units kept as three
    256-channel units at 8x8 (no stride), which depth = 36m + 20 counts. With these, the parameter counts
    match the published ones: Attention-92 1.96M (paper 1.9M), -236 5.20M (5.1M), -452 8.63M (8.6M).
    Override `modules_per_stage` (and any other argument) through keyword arguments."""
    layout = {
        "num_classes": 10,
        "stem": "cifar",
        "stem_width": 16,
        "stage_widths": (64, 128, 256),
        "pool_levels": (3, 2, 1),
        "final_units": 3,
        "final_width": 256,
        "final_stride": 1,
        "default_input_size": 32,
    }
    return ResidualAttentionNet(**{**layout, **variant, **kwargs})


def _preact_resnet_cifar(depth: int, **kwargs) -> ResidualAttentionNet:
    """Pre-activation bottleneck ResNet for CIFAR (He et al., ECCV 2016): depth = 9n + 2, three stages of n
    units with 64/128/256 output channels, no Attention Modules."""
    if (depth - 2) % 9:
        raise ValueError(f"a bottleneck pre-activation ResNet needs depth = 9n + 2, got {depth}")
    n = (depth - 2) // 9
    return _cifar(
        {"modules_per_stage": (0, 0, 0), "units_per_stage": (n - 1,) * 3, "final_units": 0}, **kwargs
    )


@register_model
def attention56(**kwargs) -> ResidualAttentionNet:
    """Attention-56 for ImageNet: one Attention Module per stage (Table 2)."""
    return _imagenet({"modules_per_stage": (1, 1, 1)}, **kwargs)


@register_model
def attention92(**kwargs) -> ResidualAttentionNet:
    """Attention-92 for ImageNet: 1, 2 and 3 Attention Modules in the three stages (Table 2)."""
    return _imagenet({"modules_per_stage": (1, 2, 3)}, **kwargs)


@register_model
def attention_next56(**kwargs) -> ResidualAttentionNet:
    """AttentionNeXt-56 for ImageNet as released (AttentionNeXt-56-deploy.prototxt): Attention-56's layout
    with post-activation ResNeXt units (32 groups, bottleneck half the width), so no BN-ReLU after the stem's
    pooling (the first unit starts with its conv) nor before the average pooling, and mask heads 1x1
    conv-BN-ReLU-1x1 conv-sigmoid."""
    return _imagenet(
        {"modules_per_stage": (1, 1, 1), "unit": "postact", "groups": 32, "bottleneck_ratio": 0.5}, **kwargs
    )


@register_model
def attention56_cifar(**kwargs) -> ResidualAttentionNet:
    """Attention-56 for CIFAR: m = 1 module per stage, p, t, r = 1, 2, 1."""
    return _cifar({"modules_per_stage": (1, 1, 1)}, **kwargs)


@register_model
def attention92_cifar(**kwargs) -> ResidualAttentionNet:
    """Attention-92 for CIFAR: m = 2 modules per stage. (ImageNet's Attention-92 has 1/2/3; on CIFAR that
    split
    gives 2.45M parameters against the published 1.9M, while 2/2/2 gives 1.96M.)"""
    return _cifar({"modules_per_stage": (2, 2, 2)}, **kwargs)


@register_model
def attention128_cifar(**kwargs) -> ResidualAttentionNet:
    """Attention-128 for CIFAR: m = 3 modules per stage."""
    return _cifar({"modules_per_stage": (3, 3, 3)}, **kwargs)


@register_model
def attention164_cifar(**kwargs) -> ResidualAttentionNet:
    """Attention-164 for CIFAR: m = 4 modules per stage."""
    return _cifar({"modules_per_stage": (4, 4, 4)}, **kwargs)


@register_model
def attention236_cifar(**kwargs) -> ResidualAttentionNet:
    """Attention-236 for CIFAR: m = 6 modules per stage."""
    return _cifar({"modules_per_stage": (6, 6, 6)}, **kwargs)


@register_model
def attention452_cifar(**kwargs) -> ResidualAttentionNet:
    """Attention-452 for CIFAR: m = 6 modules per stage with p, t, r = 2, 4, 3. Its masks have r = 3 units at
    the lowest resolution, not 2r: that gives the published 8.6M parameters (2r would give 10.3M)."""
    return _cifar({"modules_per_stage": (6, 6, 6), "p": 2, "t": 4, "r": 3, "bottom_units": 3}, **kwargs)


@register_model
def preact_resnet164_cifar(**kwargs) -> ResidualAttentionNet:
    """Pre-activation ResNet-164 (18 bottleneck units per stage), the paper's CIFAR baseline."""
    return _preact_resnet_cifar(164, **kwargs)


@register_model
def preact_resnet1001_cifar(**kwargs) -> ResidualAttentionNet:
    """Pre-activation ResNet-1001 (111 bottleneck units per stage), the paper's CIFAR baseline."""
    return _preact_resnet_cifar(1001, **kwargs)
