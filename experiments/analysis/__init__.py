"""The paper's two analyses of trained (or freshly initialised) Residual Attention Networks.

1. Mean absolute response of each stage's output, naive attention learning against attention residual
   learning (Wang et al., CVPR 2017, Sec. 4.1 and its figure on Attention-164): :mod:`.responses`.
2. Soft-mask pictures, every Attention Module's mask M(x) over input images: :mod:`.masks`.

The networks they look at (module, checkpoint, registered name, run directory): :mod:`.networks`; their
images: :mod:`.images`; the W&B run they attach to: :mod:`.tracking`; the command line
(`python -m experiments responses|masks`): :mod:`.cli`. The pictures themselves are drawn by
`ran.tools.pictures`."""

from experiments.analysis.cli import AnalysisError, main
from experiments.analysis.images import DATASETS, AnalysisImages, load_analysis_images
from experiments.analysis.masks import save_mask_pictures
from experiments.analysis.networks import (
    NetworkSpec,
    RunDirectory,
    infer_dataset,
    load_checkpoint_network,
    resolve_network,
)
from experiments.analysis.responses import ResponseTable, compare_responses, stage_responses
from experiments.analysis.tracking import attached_wandb_run

__all__ = [
    "DATASETS",
    "AnalysisError",
    "AnalysisImages",
    "NetworkSpec",
    "ResponseTable",
    "RunDirectory",
    "attached_wandb_run",
    "compare_responses",
    "infer_dataset",
    "load_analysis_images",
    "load_checkpoint_network",
    "main",
    "resolve_network",
    "save_mask_pictures",
    "stage_responses",
]
