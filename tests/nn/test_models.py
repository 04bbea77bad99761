"""The networks: shapes, gradients, the paper's equations, sizes, stored outputs and argument errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import ran
from ran.nn.attention import (
    AttentionModule,
    ChannelAttention,
    HourglassMask,
    LocalMask,
    MixedAttention,
    SpatialAttention,
    hourglass_unit_count,
)
from ran.nn.units import PostActBottleneck, PreActBottleneck, UnitSpec
from ran.tools.measure import count_macs, count_params
from ran.tools.summary import summary_main

EXPECTED = Path(__file__).parent / "expected" / "seeded_outputs.json"
TINY = {"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64}
PAPER_VARIANTS = [
    "attention56_cifar",
    "attention92_cifar",
    "attention128_cifar",
    "attention164_cifar",
    "attention236_cifar",
    "attention452_cifar",
    "preact_resnet164_cifar",
    "preact_resnet1001_cifar",
    "attention56",
    "attention92",
    "attention_next56",
]


def test_every_paper_variant_is_registered():
    assert set(PAPER_VARIANTS) <= set(ran.list_models())
    assert ran.list_models("attention*_cifar") == sorted(
        n for n in PAPER_VARIANTS if n.startswith("attention") and n.endswith("_cifar")
    )


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_forward_shape_of_every_variant(name):
    # train mode: BN uses batch statistics (at initialisation the running ones make ResNet-1001 overflow)
    model = ran.create_model(name, num_classes=7)
    size = model.default_input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, 7)
    stride = model.feature_stride
    assert features.shape == (2, model.num_features, size // stride, size // stride)
    assert torch.isfinite(logits).all()


def main_path_depth(model: ran.ResidualAttentionNet) -> int:
    """Weighted layers along the trunk: the stem conv, three per residual unit, the classifier."""
    units = 0
    for stage in model.stages:
        for block in stage:
            units += (
                len(block.pre) + len(block.trunk) + len(block.post)
                if isinstance(block, AttentionModule)
                else 1
            )
    return 3 * units + 2


@pytest.mark.parametrize(
    "name,depth",
    [
        ("attention56_cifar", 56),
        ("attention92_cifar", 92),
        ("attention128_cifar", 128),
        ("attention164_cifar", 164),
        ("attention236_cifar", 236),
        ("attention452_cifar", 452),
        ("preact_resnet164_cifar", 164),
        ("preact_resnet1001_cifar", 1001),
        ("attention56", 56),
        ("attention92", 92),
        ("attention_next56", 56),
    ],
)
def test_depth_matches_the_name(name, depth):
    assert main_path_depth(ran.create_model(name)) == depth


# --- sizes (Sec. 4, Tables 5-7; figures in shared/paper.md) ------------------------------------------------


@pytest.mark.parametrize(
    "name,paper_m,tol",
    [
        ("attention92_cifar", 1.9, 0.05),
        ("attention236_cifar", 5.1, 0.05),
        ("attention452_cifar", 8.6, 0.05),
        ("preact_resnet164_cifar", 1.7, 0.03),
        ("preact_resnet1001_cifar", 10.3, 0.03),
        ("attention56", 31.9, 0.03),
        ("attention92", 51.3, 0.03),
    ],
)
def test_parameter_counts_match_the_paper(name, paper_m, tol):
    num_classes = 1000 if "cifar" not in name else 10
    params = count_params(ran.create_model(name, num_classes=num_classes)) / 1e6
    assert abs(params - paper_m) / paper_m <= tol, f"{name}: {params:.3f}M vs paper {paper_m}M"


@pytest.mark.parametrize("name,paper_g", [("attention56", 6.2), ("attention92", 10.4)])
def test_multiply_adds_match_the_paper(name, paper_g):
    macs = count_macs(ran.create_model(name), 224) / 1e9
    assert abs(macs - paper_g) / paper_g <= 0.03, f"{name}: {macs:.3f}G vs paper {paper_g}G"


@pytest.mark.parametrize(
    "name,params,macs_g",
    [
        ("attention56", 31_810_728, 6.27),
        ("attention92", 52_466_344, 10.53),
        ("attention_next56", 31_318_824, 6.42),
    ],
)
def test_released_model_files_are_matched_exactly(name, params, macs_g):
    """The authors' released Caffe files (*-deploy.prototxt): exact parameters (1000 classes) and
    multiply-adds at 224x224 to the figure's precision."""
    model = ran.create_model(name)
    assert count_params(model) == params
    assert round(count_macs(model, 224) / 1e9, 2) == macs_g


# --- unit layouts (the released files' BN and ReLU placement) ----------------------------------------------


def layer_sequence(module: nn.Module) -> list[str]:
    """What `module.forward` runs, in order: submodule names and functions (torch.fx)."""
    nodes = fx.symbolic_trace(module).graph.nodes
    return [
        n.target if n.op == "call_module" else n.target.__name__
        for n in nodes
        if n.op in ("call_module", "call_function")
    ]


POSTACT = ["conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"]
PREACT = ["bn1", "relu", "conv1", "bn2", "relu", "conv2", "bn3", "relu", "conv3", "add"]


def test_attention_next56_is_built_from_the_released_post_activation_resnext_units():
    """AttentionNeXt-56-deploy.prototxt: 1x1 conv-BN-ReLU, grouped 3x3 conv (the stride)-BN-ReLU, 1x1 conv-BN,
    a 1x1 conv-BN projection shortcut, a ReLU after the sum; 110 convolutions and 107 BatchNorms in all."""
    net = ran.create_model("attention_next56")
    units = [m for m in net.modules() if isinstance(m, (PreActBottleneck, PostActBottleneck))]
    assert len(units) == 33 and all(isinstance(u, PostActBottleneck) for u in units)
    transition = net.stages.stage2[0]  # 256 -> 512 channels at stride 2
    assert layer_sequence(transition) == [*POSTACT, "shortcut.0", "shortcut.1", "add", "relu"]
    assert [type(m) for m in transition.shortcut] == [nn.Conv2d, nn.BatchNorm2d]
    assert transition.shortcut[0].stride == transition.conv2.stride == (2, 2) and transition.conv1.stride == (
        1,
        1,
    )
    assert (transition.conv1.out_channels, transition.conv2.groups, transition.conv3.out_channels) == (
        256,
        32,
        512,
    )
    identity = net.stages.stage2[1].trunk[0]
    assert identity.shortcut is None and layer_sequence(identity) == [*POSTACT, "add", "relu"]
    counts = Counter(type(m) for m in net.modules())
    assert (counts[nn.Conv2d], counts[nn.BatchNorm2d]) == (110, 107)


def test_attention_next56_stem_mask_heads_and_end_are_as_released():
    """No BN-ReLU after the stem's pooling (the first unit starts with its conv) nor before the average
    pooling; mask heads 1x1 conv-BN-ReLU-1x1 conv-sigmoid."""
    net = ran.create_model("attention_next56")
    assert [type(m) for m in net.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert layer_sequence(net.stages.stage1[0])[0] == "conv1"
    assert isinstance(net.norm, nn.Identity)
    heads = [m.mask.head for m in net.attention_modules.values()]
    assert len(heads) == 3
    for head in heads:
        assert [type(m) for m in head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, MixedAttention]


def test_attention56_keeps_the_released_pre_activation_units():
    net = ran.create_model("attention56")
    assert layer_sequence(net.stages.stage2[0]) == [*PREACT[:2], "shortcut", *PREACT[2:]]
    assert layer_sequence(net.stages.stage2[1].trunk[0]) == PREACT
    assert [type(m) for m in net.norm] == [nn.BatchNorm2d, nn.ReLU]
    head = net.stages.stage1[1].mask.head
    assert [type(m) for m in head] == [
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Conv2d,
        MixedAttention,
    ]


def test_any_variant_can_use_post_activation_units():
    torch.manual_seed(0)
    model = ran.create_model("attention56_cifar", unit="postact", groups=2, bottleneck_ratio=0.5, **TINY)
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    units = [m for m in model.modules() if isinstance(m, (PreActBottleneck, PostActBottleneck))]
    assert units and all(isinstance(u, PostActBottleneck) for u in units)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,attention,learning",
    [
        ("hourglass", "mixed", "arl"),
        ("hourglass", "channel", "nal"),
        ("hourglass", "spatial", "arl"),
        ("local", "mixed", "nal"),
        ("cbam", "mixed", "arl"),
        ("cbam_channel", "mixed", "nal"),
        ("cbam_spatial", "mixed", "arl"),
        ("se", "mixed", "arl"),
        ("none", "mixed", "arl"),
    ],
)
def test_backward_reaches_every_parameter(mask, attention, learning):
    torch.manual_seed(0)
    model = ran.create_model(
        "attention56_cifar", num_classes=5, mask=mask, attention=attention, learning=learning, **TINY
    )
    x = torch.randn(4, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".mask." in n) or mask == "none"


# --- the module's equations ---------------------------------------------------------------------------------


def _force_mask(module: AttentionModule, value: float):
    return module.mask_out.register_forward_hook(lambda _m, _i, out: torch.full_like(out, value))


@pytest.mark.parametrize("learning,value", [("arl", 0.0), ("nal", 1.0)])
def test_forced_mask_returns_the_trunk(learning, value):
    """ARL with M = 0 and NAL with M = 1 both give H = T exactly (Eq. 1 and Eq. 3)."""
    torch.manual_seed(0)
    module = AttentionModule(32, pool_levels=2, learning=learning).eval()
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        expected = module.post(module.trunk(module.pre(x)))
        handle = _force_mask(module, value)
        out = module(x)
        handle.remove()
        unforced = module(x)
    assert torch.equal(out, expected)
    assert not torch.allclose(unforced, expected)


def test_arl_and_nal_combine_mask_and_trunk_as_the_paper_says():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    for learning, combine in (("arl", lambda m, t: (1 + m) * t), ("nal", lambda m, t: m * t)):
        module = AttentionModule(32, pool_levels=1, learning=learning).eval()
        with torch.no_grad():
            pre = module.pre(x)
            trunk = module.trunk(pre)
            mask = module.mask(pre, trunk)
            expected = module.post(combine(mask, trunk))
            torch.testing.assert_close(module(x), expected)


def test_activations_equal_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 7) * 3
    torch.testing.assert_close(MixedAttention()(x), 1 / (1 + torch.exp(-x)))
    norm = torch.sqrt((x**2).sum(dim=1, keepdim=True))
    torch.testing.assert_close(ChannelAttention()(x), x / norm)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(SpatialAttention()(x), torch.sigmoid((x - mean) / std), rtol=1e-4, atol=1e-5)


def test_activations_are_numerically_safe():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(ChannelAttention()(zeros), zeros)
    assert torch.allclose(SpatialAttention()(torch.ones(2, 4, 1, 1) * 5), torch.full((2, 4, 1, 1), 0.5))
    big = torch.randn(2, 4, 3, 3) * 1e4
    for act in (MixedAttention(), ChannelAttention(), SpatialAttention()):
        assert torch.isfinite(act(big)).all()


@pytest.mark.parametrize("attention", ["mixed", "spatial"])
def test_mixed_and_spatial_masks_lie_in_the_open_unit_interval(attention):
    torch.manual_seed(0)
    model = ran.create_model("attention56_cifar", attention=attention, **TINY)  # batch-statistics BN
    masks = model.soft_masks(torch.randn(2, 3, 32, 32))
    assert len(masks) == 3
    for m in masks.values():
        assert (m > 0).all() and (m < 1).all()


def test_channel_mask_has_unit_norm_at_every_position():
    torch.manual_seed(0)
    model = ran.create_model("attention56_cifar", attention="channel", **TINY).eval()
    for m in model.soft_masks(torch.randn(2, 3, 32, 32)).values():
        torch.testing.assert_close(m.norm(dim=1), torch.ones_like(m[:, 0]))


# --- the soft mask branches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(15, 15), (9, 13), (8, 8), (57, 56)])
def test_hourglass_upsamples_to_the_exact_size(size):
    mask = HourglassMask(8, UnitSpec(), r=1, pool_levels=3, bottom_units=2, attention="mixed")
    x = torch.randn(2, 8, *size)
    assert mask(x, x).shape == x.shape


def test_hourglass_structure_follows_the_released_models():
    """Stage 1 of ImageNet Attention-56: r units per level, 2r at the bottom, a skip unit per level but the
    deepest, r units after each up-sampling but the last."""
    mask = ran.create_model("attention56").stages.stage1[1].mask
    assert isinstance(mask, HourglassMask)
    assert [len(d) for d in mask.down] == [1, 1, 2]
    assert len(mask.skips) == 2 and [len(u) for u in mask.up] == [1, 1]
    levels = [m.mask.pool_levels for m in ran.create_model("attention92").attention_modules.values()]
    assert levels == [3, 2, 2, 1, 1, 1]


def test_local_mask_has_as_many_units_as_the_hourglass_and_keeps_resolution():
    local = ran.create_model("attention56_cifar", mask="local").stages.stage1[1].mask
    assert isinstance(local, LocalMask)
    assert len(local.units) == hourglass_unit_count(r=1, pool_levels=3, bottom_units=2) == 8
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in local.modules())


@pytest.mark.parametrize(
    "mask,shape",
    [
        ("cbam", (2, 64, 32, 32)),
        ("cbam_channel", (2, 64, 1, 1)),
        ("cbam_spatial", (2, 1, 32, 32)),
        ("se", (2, 64, 1, 1)),
        ("hourglass", (2, 64, 32, 32)),
        ("local", (2, 64, 32, 32)),
    ],
)
def test_soft_masks_have_the_documented_shapes(mask, shape):
    model = ran.create_model("attention56_cifar", mask=mask).eval()
    masks = model.soft_masks(torch.randn(2, 3, 32, 32))
    assert list(masks) == ["stages.stage1.1", "stages.stage2.1", "stages.stage3.1"]
    assert masks["stages.stage1.1"].shape == shape


def test_cbam_mask_times_trunk_is_cbam():
    """M * T equals CBAM's sequential refinement: F' = Mc(F) F, F'' = Ms(F') F'."""
    torch.manual_seed(0)
    cbam = ran.create_model("attention56_cifar", mask="cbam").stages.stage1[1].mask.eval()
    t = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        f1 = cbam.channel_gate(t) * t
        expected = cbam.spatial_gate(f1) * f1
        torch.testing.assert_close(cbam(t, t) * t, expected)


class OfficialCBAM(nn.Module):
    """CBAM laid out as its official code (Jongchan/attention-module, MODELS/cbam.py), condensed:
    ChannelGate's shared MLP of Linear layers over the avg- and max-pooled descriptors; SpatialGate's
    ChannelPool cat(max, mean), 7x7 BasicConv with BN(eps=1e-5, momentum=0.01), no ReLU; sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.ChannelGate = nn.Module()
        self.ChannelGate.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )
        self.SpatialGate = nn.Module()
        self.SpatialGate.spatial = nn.Module()
        self.SpatialGate.spatial.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.SpatialGate.spatial.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, mlp = x.shape[2:], self.ChannelGate.mlp
        x = x * torch.sigmoid(mlp(F.avg_pool2d(x, size)) + mlp(F.max_pool2d(x, size)))[:, :, None, None]
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        spatial = self.SpatialGate.spatial
        return x * torch.sigmoid(spatial.bn(spatial.conv(pooled)))


def test_official_cbam_weights_load_and_give_its_output():
    torch.manual_seed(0)
    official = OfficialCBAM(64)
    for p in official.parameters():  # BN weight and bias too, so a swapped channel or parameter shows
        nn.init.uniform_(p, -0.5, 0.5)
    ours = ran.create_model("attention56_cifar", mask="cbam").stages.stage1[1].mask
    names = {"ChannelGate.mlp.1": "channel_gate.mlp.0", "ChannelGate.mlp.3": "channel_gate.mlp.2"}
    names |= {"SpatialGate.spatial.conv": "spatial_gate.conv", "SpatialGate.spatial.bn": "spatial_gate.bn"}
    state = {}
    for key, value in official.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        target = f"{names[module]}.{leaf}"
        state[target] = value.reshape(ours.state_dict()[target].shape)  # Linear (out, in) -> 1x1 conv
    ours.load_state_dict(state)
    t = torch.randn(4, 64, 8, 8) * 2
    for mode in (True, False):  # batch statistics (and the running-average update), then running ones
        official.train(mode), ours.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(ours(t, t) * t, official(t))
        torch.testing.assert_close(
            ours.spatial_gate.bn.running_mean, official.SpatialGate.spatial.bn.running_mean
        )


def test_no_mask_is_the_plain_trunk_of_equal_depth():
    plain = ran.create_model("attention56_cifar", mask="none")
    assert not plain.soft_masks(torch.randn(1, 3, 32, 32))
    assert main_path_depth(plain) == 56


# --- the shared interface -----------------------------------------------------------------------------------


def test_reset_classifier_and_features():
    model = ran.create_model("attention56_cifar", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


def test_module_counts_can_be_overridden():
    model = ran.create_model("attention92_cifar", modules_per_stage=(1, 2, 3))
    assert [len([b for b in s if isinstance(b, AttentionModule)]) for s in model.stages][:3] == [1, 2, 3]


def test_initialisation():
    model = ran.create_model("attention56_cifar", **TINY)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) and not b.bias.any() for b in bns)
    conv = model.stages.stage3[0].conv2  # 3x3, fan_out = 16 * 9
    assert abs(conv.weight.std().item() - (2 / (16 * 9)) ** 0.5) < 0.2 * (2 / (16 * 9)) ** 0.5


# --- stored outputs (a silent architecture change fails here) -----------------------------------------------

SEEDED = {
    "attention56_cifar": {"num_classes": 10},
    "attention56_cifar-spatial-nal-local": {
        "num_classes": 10,
        "attention": "spatial",
        "learning": "nal",
        "mask": "local",
    },
    "attention56_cifar-cbam": {"num_classes": 10, "mask": "cbam"},
}


def _seeded_output(key: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = ran.create_model(key.split("-")[0], **SEEDED[key])
    # one training step of BN statistics makes the running buffers part of what is checked
    model.train()(torch.randn(4, 3, 32, 32))
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("key", list(SEEDED))
def test_seeded_outputs_equal_the_stored_values(key):
    out = _seeded_output(key)
    if os.environ.get("RAN_REGENERATE_EXPECTED"):
        stored = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
        stored[key] = out.tolist()
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(stored, indent=1))
    expected = torch.tensor(json.loads(EXPECTED.read_text())[key])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# --- bad arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"attention": "softmax"}, ["attention", "'mixed'", "'channel'", "'spatial'"]),
        ({"learning": "residual"}, ["learning", "'arl'", "'nal'"]),
        ({"mask": "unet"}, ["mask", "'hourglass'", "'local'", "'cbam'", "'se'", "'none'"]),
        ({"mask": "se", "attention": "channel"}, ["'hourglass'", "'local'", "attention='mixed'"]),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs, words):
    with pytest.raises(ValueError) as err:
        ran.create_model("attention56_cifar", **kwargs)
    for word in words:
        assert word in str(err.value)


def test_unset_switches_are_dropped_by_create_model():
    torch.manual_seed(0)
    unset = ran.create_model("attention56_cifar", attention=None, learning=None, mask=None, num_classes=None)
    torch.manual_seed(0)
    default = ran.create_model("attention56_cifar")
    assert unset.num_classes == 10 and str(unset) == str(default)
    assert all(torch.equal(a, b) for a, b in zip(unset.state_dict().values(), default.state_dict().values()))


def test_unknown_unit_names_the_valid_choices():
    with pytest.raises(ValueError, match="unknown unit 'resnext'; valid choices: 'preact', 'postact'"):
        ran.create_model("attention56", unit="resnext")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="attention92_cifar.*preact_resnet164_cifar"):
        ran.create_model("attention93_cifar")


def test_too_small_input_names_the_minimum():
    model = ran.create_model("attention56_cifar", **TINY)
    assert model.min_input_size == 8
    with pytest.raises(ValueError, match="at least 8"):
        model(torch.randn(1, 3, 4, 4))
    assert ran.create_model("attention56").min_input_size == 32
    with pytest.raises(ValueError, match="at least 4x4"):
        AttentionModule(16, pool_levels=2)(torch.randn(1, 16, 3, 3))


# --- ran summary --------------------------------------------------------------------------------------------


def test_summary_prints_parameters_macs_and_stage_shapes(capsys):
    assert summary_main(["attention56"]) == 0
    out = capsys.readouterr().out
    assert "31,810,728" in out and "paper 31.9M" in out and "6.271G" in out
    assert "stage1   (256, 56, 56)" in out and "stage4   (2048, 7, 7)" in out


def test_summary_of_unknown_model_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        summary_main(["resnet50"])
    assert exit_info.value.code == 2
    assert "known models" in capsys.readouterr().err


def test_the_docs_size_table_is_what_the_code_prints():
    from ran.tools.summary import size_table

    page = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    table = page.split("<!-- sizes:start -->")[1].split("<!-- sizes:end -->")[0].strip()
    assert table == size_table(markdown=True), (
        "docs/models.md's size table is stale: run `ran summary --all --markdown`"
    )
