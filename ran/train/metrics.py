"""`TopKAccuracy`: the training accuracy, accumulated on the device without the host ever waiting for it."""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["TopKAccuracy"]


class TopKAccuracy(Metric):
    """The fraction of images whose label is among the `top_k` highest logits (top-1 / top-5 accuracy).

    Updated every training step, so it must not read device values on the host: one `topk`, a comparison
    and two sums per batch, all on the device. torchmetrics' `MulticlassAccuracy` gives the same figure but
    one-hot encodes the top-k predictions, which reads the labels' range on the host (a GPU synchronisation
    per step); validation and test keep it (`tests/train/test_host_sync.py` compares the two).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Count a batch: `logits` (B, C), `target` (B,) class indices."""
        top = logits.topk(min(self.top_k, logits.shape[1]), dim=1).indices
        self.correct += (top == target[:, None]).any(dim=1).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total
