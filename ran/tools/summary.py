"""`ran summary`: parameter counts, multiply-adds and per-stage output shapes of the registered models."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from ran.nn.registry import create_model, list_models
from ran.nn.units import ATTENTIONS, LEARNINGS, MASKS
from ran.tools.markdown import markdown_lines
from ran.tools.measure import count_macs, count_params

# Sizes given by the paper (parameters in millions, multiply-adds at 224x224 in billions).
PAPER_SIZES: dict[str, tuple[float | None, float | None]] = {
    "attention56": (31.9, 6.2),
    "attention92": (51.3, 10.4),
    "attention92_cifar": (1.9, None),
    "attention236_cifar": (5.1, None),
    "attention452_cifar": (8.6, None),
    "preact_resnet164_cifar": (1.7, None),
    "preact_resnet1001_cifar": (10.3, None),
}
# Sizes of the authors' released Caffe model files (fwang91/residual-attention-network, *-deploy.prototxt):
# exact parameters with 1000 classes, multiply-adds at 224x224 in billions.
RELEASED_SIZES: dict[str, tuple[int, float]] = {
    "attention56": (31_810_728, 6.27),
    "attention92": (52_466_344, 10.53),
    "attention_next56": (31_318_824, 6.42),
}


@dataclass
class ModelSummary:
    name: str
    params: int
    macs: int
    input_size: int
    num_classes: int
    stage_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def paper_params(self) -> float | None:
        return PAPER_SIZES.get(self.name, (None, None))[0]

    @property
    def paper_macs(self) -> float | None:
        return PAPER_SIZES.get(self.name, (None, None))[1]

    @property
    def released_params(self) -> int | None:
        return RELEASED_SIZES.get(self.name, (None, None))[0]

    @property
    def released_macs(self) -> float | None:
        return RELEASED_SIZES.get(self.name, (None, None))[1]


def summarize(name: str, input_size: int | None = None, **kwargs) -> ModelSummary:
    """Build `name` (with `kwargs`) and measure it at `input_size` (default: the variant's own)."""
    model = create_model(name, **kwargs)
    size = input_size or model.default_input_size
    shapes = model.stage_shapes(torch.zeros(1, 3, size, size)) if hasattr(model, "stage_shapes") else {}
    return ModelSummary(
        name,
        count_params(model),
        count_macs(model, size),
        size,
        model.num_classes,
        {k: v[1:] for k, v in shapes.items()},
    )


def _fmt(value: float | None, unit: str, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.2f}{unit}"


def size_table(names: list[str] | None = None, markdown: bool = True) -> str:
    """The table of every model's parameters and multiply-adds beside the paper's figures and the released
    model files' (the authors' Caffe definitions)."""
    rows = [
        (
            "model",
            "input",
            "params",
            "params (paper)",
            "params (released model file)",
            "mult-adds",
            "mult-adds (paper)",
            "mult-adds (released model file)",
        )
    ]
    summaries = sorted(
        (summarize(name) for name in names or list_models()), key=lambda s: (s.input_size, s.params)
    )
    for s in summaries:
        rows.append(
            (
                s.name,
                f"{s.input_size}x{s.input_size}",
                _fmt(s.params / 1e6, "M"),
                _fmt(s.paper_params, "M"),
                _fmt(s.released_params, "M", 1e6),
                _fmt(s.macs / 1e9, "G"),
                _fmt(s.paper_macs, "G"),
                _fmt(s.released_macs, "G"),
            )
        )
    if markdown:
        return "\n".join(markdown_lines(rows[0], rows[1:]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def format_summary(s: ModelSummary) -> str:
    lines = [
        f"{s.name}: {s.num_classes} classes, input 3x{s.input_size}x{s.input_size}",
        f"  parameters     {s.params:,} ({s.params / 1e6:.2f}M)"
        + (f"; paper {s.paper_params}M" if s.paper_params else "")
        + (f"; released model file {s.released_params:,}" if s.released_params else ""),
        f"  multiply-adds  {s.macs:,} ({s.macs / 1e9:.3f}G)"
        + (f"; paper {s.paper_macs}G" if s.paper_macs else "")
        + (f"; released model file {s.released_macs}G" if s.released_macs else ""),
        "  output shapes (C, H, W):",
    ]
    lines += [f"    {k:8s} {tuple(v)}" for k, v in s.stage_shapes.items()]
    return "\n".join(lines)


def summary_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ran summary",
        description="Parameters, multiply-adds (torch's "
        "FlopCounterMode, one multiply-add = 2 FLOPs) and per-stage output shapes.",
    )
    parser.add_argument("model", nargs="?", help=f"one of: {', '.join(list_models())}")
    parser.add_argument(
        "--all", action="store_true", help="a table of every registered model beside the paper"
    )
    parser.add_argument("--markdown", action="store_true", help="with --all: a markdown table")
    parser.add_argument("--num-classes", type=int, help="classifier outputs (default: the variant's own)")
    parser.add_argument("--input-size", type=int, help="input height and width (default: the variant's own)")
    parser.add_argument("--attention", choices=ATTENTIONS)
    parser.add_argument("--learning", choices=LEARNINGS)
    parser.add_argument("--mask", choices=MASKS)
    args = parser.parse_args(argv)
    if args.all:
        print(size_table(markdown=args.markdown))
        return 0
    if not args.model:
        parser.error("name a model, or pass --all")
    try:
        summary = summarize(
            args.model,
            args.input_size,
            num_classes=args.num_classes,
            attention=args.attention,
            learning=args.learning,
            mask=args.mask,
        )
        print(format_summary(summary))
    except ValueError as err:
        parser.exit(2, f"ran summary: error: {err}\n")
    return 0
