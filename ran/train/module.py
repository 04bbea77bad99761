"""`ImageClassifier`: the LightningModule that trains any registered network with the paper's recipe.

Recipe (Sec. 4.1 CIFAR, Sec. 4.2 ImageNet): cross-entropy, SGD with Nesterov momentum 0.9 and weight decay
1e-4, learning rate 0.1 divided by 10 at fixed ITERATIONS (CIFAR: 64k and 96k, stop at 160k; ImageNet: 200k,
400k and 500k, stop at 530k; the stop is `trainer.max_steps`). The learning rate is given at
`base_batch_size` and can be scaled linearly with the global batch (per-device batch x devices x nodes x
gradient accumulation). Cosine and linear decay over `trainer.max_steps` are the alternatives for a compressed
schedule. Metrics: top-1/top-5 accuracy and top-1/top-5 error in % (the paper reports error), the best
validation top-1, and per-class test accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ran.nn.registry import create_model
from ran.nn.units import Attention, Learning, Mask
from ran.train.config import ConfigError
from ran.train.graphed_step import GraphedStep, carry_step_count, count_optimizer_step
from ran.train.metrics import TopKAccuracy
from ran.train.recipe import (
    CUDA_GRAPH_MODES,
    CompileMode,
    LRFactor,
    Schedule,
    check_cuda_graph,
    check_recipe,
    effective_batch_size,
)

__all__ = ["NETWORK_KEYS", "ImageClassifier", "describe_network", "network_of"]

NETWORK_KEYS = ("arch", "num_classes", "attention", "learning", "mask", "model_kwargs")


def network_of(hparams: Any) -> dict[str, Any]:
    """The settings that decide a network's architecture and outputs, from ImageClassifier hyperparameters."""
    net = {k: hparams.get(k) for k in NETWORK_KEYS}
    net["model_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in (net["model_kwargs"] or {}).items()
    }
    return net


def describe_network(net: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}={net[k]}" for k in NETWORK_KEYS[2:] if net[k])
    return f"{net['arch']} with {net['num_classes']} classes" + (f" ({extra})" if extra else "")


class ImageClassifier(pl.LightningModule):
    """Trains a registered network (`ran.list_models()`) on an image classification datamodule.

    Args:
        arch: registered model name, e.g. 'attention92_cifar', 'attention56' (ImageNet).
        num_classes: classifier outputs; the CLI links it from the datamodule's `num_classes`.
        attention: the soft mask's activation (Sec. 3.3); None keeps the variant's default.
        learning: 'arl', H = (1 + M) * T (Eq. 3), or 'nal', H = M * T (Eq. 1); None keeps the variant's
            default.
        mask: the soft mask branch: the paper's 'hourglass' or 'local' (Sec. 4.1), CBAM, SE, or 'none'; None
            keeps the variant's default.
        model_kwargs: any other keyword argument of the model (e.g. `stage_widths`, `drop_rate`).
        lr: learning rate at `base_batch_size` images per step (0.1 at 64, Sec. 4.1).
        base_batch_size: the global batch size `lr` is given for.
        scale_lr: multiply `lr` by global batch / `base_batch_size` (linear scaling rule).
        momentum, nesterov, weight_decay: SGD settings (0.9, Nesterov, 1e-4 in the paper).
        label_smoothing: weight of the uniform distribution mixed into the training targets (Szegedy et al.,
            CVPR 2016; 0 in the paper). Only the training loss: validation and test losses stay plain
            cross-entropy, comparable between runs.
        schedule: 'step' (the paper's), 'cosine' or 'linear' (decay to 0 over `trainer.max_steps`, for a
            compressed schedule; see `LRFactor`); the scheduler steps every optimizer step, so `milestones`
            count iterations.
        milestones, gamma: iterations at which the learning rate is multiplied by `gamma`.
        warmup_steps: linear warm-up iterations (0 in the paper; helps large scaled learning rates).
        sync_batchnorm: use SyncBatchNorm when training on more than one CUDA process (never on CPU).
        channels_last: keep the network's weights and inputs in the channels_last memory format (NHWC), which
            the convolution kernels of cuDNN (with mixed precision) and oneDNN (CPU) run faster.
        compile: run the network through `torch.compile` (compiled on the first step; the module's state dict
            and checkpoints stay those of the plain network).
        compile_mode: torch.compile's mode; 'reduce-overhead' and 'max-autotune' also replay each compiled
            graph as a CUDA graph, which removes the per-kernel host cost on a GPU (on a CPU they fall back to
            'default' with a warning; with DDP they are refused). Each mode's compiled graph is specialised
            on the first batch size it sees (training, evaluation): a batch of another size, such as an
            epoch's last, partial one, runs eagerly instead of compiling again.
        cuda_graph: capture the whole training step (forward, loss, backward, the fused SGD update) as one
            CUDA graph after a few warm-up steps and replay it for every full batch
            (`ran.train.graphed_step`); the partial batch and evaluation run eagerly. CUDA only, one process,
            precision 32-true or bf16-mixed, no gradient accumulation or clipping; combines with `compile`
            in mode 'default' or 'max-autotune-no-cudagraphs'.
    """

    MAX_CLASS_SCALARS = 100

    def __init__(
        self,
        arch: str = "attention92_cifar",
        num_classes: int = 10,
        attention: Attention | None = None,
        learning: Learning | None = None,
        mask: Mask | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        base_batch_size: int = 64,
        scale_lr: bool = False,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        schedule: Schedule = "step",
        milestones: Sequence[int] = (64_000, 96_000),
        gamma: float = 0.1,
        warmup_steps: int = 0,
        sync_batchnorm: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the CLI sends the whole resolved config to the loggers
        switches = {"attention": attention, "learning": learning, "mask": mask}  # None: create_model drops it
        self.net = create_model(arch, num_classes=num_classes, **{**switches, **(model_kwargs or {})})
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)
        self._compiled: Any = (
            None  # torch.compile(self.net), made in setup; not a submodule, so not in state_dict
        )
        self._cuda_graphs = False  # the compiled network replays CUDA graphs
        self._compiled_batch: dict[bool, int] = {}  # training mode -> the batch size its graph is for
        # cuda_graph: the step runs forward, backward and the update itself (GraphedStep, made at step one)
        self.automatic_optimization = not cuda_graph
        self._graphed: GraphedStep | None = None
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # training loss
        self.top_k = min(5, num_classes)

        def accuracy(top_k: int = 1, average: str | None = "micro") -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes, top_k=top_k, average=average)

        # One object per split and metric: a metric accumulates state, so splits never share one. Training's
        # are updated every step and never read the device on the host (TopKAccuracy).
        self.train_acc1, self.train_acc5 = TopKAccuracy(1), TopKAccuracy(self.top_k)
        self.val_acc1, self.val_acc5 = accuracy(), accuracy(self.top_k)
        self.test_acc1, self.test_acc5 = accuracy(), accuracy(self.top_k)
        self.test_acc1_per_class = accuracy(average=None)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc1_best = MaxMetric()
        self.val_acc1_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        check_recipe(self.hparams)

    # --- model ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        x = x.contiguous(memory_format=self.memory_format)
        if self._compiled is None or self._compiled_batch.setdefault(self.training, len(x)) != len(x):
            return self.net(x)  # not compiled, or a batch size the compiled graph is not for
        if self._cuda_graphs:
            # A new iteration: the previous one's graph outputs (already consumed) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(x)

    @property
    def example_input_array(self) -> torch.Tensor | None:
        """A zero batch of one image at the datamodule's training size (its `image_size`, where it has one)
        or the network's `default_input_size`: Lightning's model summary runs it to show FLOPs and layer
        shapes. None for a compiled network (the summary's batch of one would compile it a second time)."""
        if self.hparams.get("compile"):
            return None
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(datamodule, "image_size", None) or self.net.default_input_size
        channels = next(m for m in self.net.modules() if isinstance(m, nn.Conv2d)).in_channels
        return torch.zeros(1, channels, size, size)

    def setup(self, stage: str) -> None:
        """Convert BatchNorm to SyncBatchNorm on multi-process CUDA runs (SyncBatchNorm has no CPU kernel)."""
        trainer = self.trainer
        converted = any(isinstance(m, nn.SyncBatchNorm) for m in self.net.modules())
        if (
            self.hparams.sync_batchnorm
            and not converted
            and trainer.world_size > 1
            and trainer.strategy.root_device.type == "cuda"
        ):
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        if stage == "fit" and self.hparams.get("cuda_graph"):
            try:
                check_cuda_graph(self.hparams, trainer)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.hparams.get("compile"):
            self.compile_network()

    def compile_network(self) -> None:
        """`torch.compile` the network for forward with `compile_mode`; kept outside the submodules, so
        checkpoints hold the plain network's parameters under their own names."""
        if self._compiled is not None:
            return
        mode = self.hparams.get("compile_mode") or "default"
        device = self._trainer.strategy.root_device.type if self._trainer is not None else "cpu"
        if mode in CUDA_GRAPH_MODES and device != "cuda":
            rank_zero_warn(
                f"model.compile_mode {mode} captures CUDA graphs, which need a CUDA device: compiling for "
                f"{device} with mode 'default'"
            )
            mode = "default"
        object.__setattr__(self, "_compiled", torch.compile(self.net, mode=mode))
        self._cuda_graphs = mode in CUDA_GRAPH_MODES

    # --- optimisation --------------------------------------------------------------------------------------

    def scaled_lr(self) -> float:
        """`lr`, times global batch / `base_batch_size` when `scale_lr` is set."""
        hp = self.hparams
        if not hp.scale_lr:
            return hp.lr
        batch = effective_batch_size(self.trainer)
        if batch is None:
            rank_zero_warn(
                "scale_lr is set but the datamodule has no `batch_size`: the learning rate is not scaled"
            )
            return hp.lr
        return hp.lr * batch / hp.base_batch_size

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # The fused implementation updates every parameter in one kernel (CPU and CUDA): the same update as
        # the per-tensor loop, without a loop of small operations per parameter tensor.
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters())
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.scaled_lr(),
            momentum=hp.momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.weight_decay,
            fused=fused,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def lr_factor(self) -> LRFactor:
        """The schedule of this run's config over `trainer.max_steps`."""
        hp, trainer = self.hparams, self.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        return LRFactor(hp.schedule, tuple(hp.milestones), hp.gamma, total, hp.warmup_steps)

    def apply_recipe(self) -> None:
        """Make the optimizer and schedule those of this run's config, at the current step.

        A resumed run gets the optimizer's and scheduler's state from its checkpoint, including the learning
        rate, momentum, weight decay and the schedule's own settings (`LRFactor` is saved with the scheduler).
        The config and the command line decide the recipe instead: a resume with another `lr`, `schedule`,
        `milestones` or `trainer.max_steps` continues at the step it reached on the new schedule, as if the
        run had been started with it (e.g. a cosine run extended from 1,000 to 2,000 steps continues at the
        learning rate of step 1,000 of 2,000, not at 0). Each change is reported.
        """
        hp = self.hparams
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            step, factor, base = scheduler.last_epoch, self.lr_factor(), self.scaled_lr()
            changes = []
            saved = scheduler.lr_lambdas[0]
            for key, value in vars(factor).items():
                if getattr(saved, key, value) != value:
                    changes.append(f"{key} {getattr(saved, key)} -> {value}")
            if not math.isclose(scheduler.base_lrs[0], base):
                changes.append(f"base learning rate {scheduler.base_lrs[0]:g} -> {base:g}")
            scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
            scheduler.base_lrs = [base] * len(scheduler.optimizer.param_groups)
            for group in scheduler.optimizer.param_groups:
                for key in ("momentum", "nesterov", "weight_decay"):
                    if group[key] != hp[key]:
                        changes.append(f"{key} {group[key]} -> {hp[key]}")
                        group[key] = hp[key]
                group["initial_lr"] = base
                group["lr"] = base * factor(step)
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
            if changes and step > 0:
                rank_zero_warn(
                    f"resuming at step {step} with the config's recipe: {'; '.join(changes)}; "
                    f"learning rate now {base * factor(step):.4g}"
                )

    def on_train_start(self) -> None:
        """Apply the config's recipe (over a resumed checkpoint's), then log the effective batch size, the
        learning rate it gives and the realised clean-label ratio."""
        carry_step_count(self.trainer)  # a checkpoint of the other optimization mode continues at its step
        self.apply_recipe()
        self.log_run_facts()
        self._graphed = None  # a new fit captures its own optimizer's step

    # --- steps ---------------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.automatic_optimization:
            logits = self(x)
            loss = self.criterion(logits, y)
        else:
            logits, loss = self.graphed_step(x, y)
        self.train_acc1.update(logits.detach(), y)
        self.train_acc5.update(logits.detach(), y)
        # Not on the progress bar: Lightning would read it on the host after every step (StepProgressBar
        # shows it at the log steps).
        self.log("train/loss", loss)
        return loss

    def graphed_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`cuda_graph`'s step: forward, loss, backward and the SGD update through `GraphedStep` (captured on
        CUDA), counted as Lightning's optimizer step, then the schedule's step. The loss is copied out of the
        graph's buffer, which the next step overwrites."""
        optimizer = self.optimizers()
        if self._graphed is None:
            capture = self.device.type == "cuda"
            self._graphed = GraphedStep(self, self.criterion, optimizer.optimizer, capture=capture)
        logits, loss = self._graphed(x, y)
        count_optimizer_step(optimizer)
        self.lr_schedulers().step()
        return logits, loss.clone()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        """Update `split`'s loss and top-1/top-5 metrics with one batch; returns the logits."""
        x, y = batch
        logits = self(x)
        getattr(self, f"{split}_loss").update(nn.functional.cross_entropy(logits, y), weight=y.numel())
        getattr(self, f"{split}_acc1").update(logits, y)
        getattr(self, f"{split}_acc5").update(logits, y)
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, "test")
        self.test_acc1_per_class.update(logits, batch[1])

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities (B, num_classes) for a batch of images (or of (images, labels))."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=1)

    # --- epoch ends: metrics are computed (and synced across processes) by torchmetrics ---------------------

    def _log_split(
        self, split: str, acc1: MulticlassAccuracy, acc5: MulticlassAccuracy, loss: MeanMetric | None = None
    ) -> torch.Tensor:
        """Log `<split>/acc1`, `/acc5`, `/err1`, `/err5` (error in %, as the paper reports) and `/loss`."""
        top1, top5 = acc1.compute(), acc5.compute()
        values = {f"{split}/acc1": top1, f"{split}/err1": 100.0 * (1.0 - top1)}
        if self.top_k == 5:
            values.update({f"{split}/acc5": top5, f"{split}/err5": 100.0 * (1.0 - top5)})
        if loss is not None:
            values[f"{split}/loss"] = loss.compute()
            loss.reset()
        # The values are already reduced over processes; sync_dist only keeps every rank's copy identical.
        self.log_dict(values, sync_dist=True)
        acc1.reset()
        acc5.reset()
        return top1

    def on_train_epoch_end(self) -> None:
        if self.train_acc1.update_called:
            self._log_split("train", self.train_acc1, self.train_acc5)

    def on_validation_epoch_end(self) -> None:
        top1 = self._log_split("val", self.val_acc1, self.val_acc5, self.val_loss)
        if self.trainer.state.fn != "fit":
            return  # `ran validate` reports its own figures, never the best restored from the fit
        if not self.trainer.sanity_checking:
            self.val_acc1_best.update(top1)
        if self.val_acc1_best.update_called:
            self.log("val/acc1_best", self.val_acc1_best.compute(), sync_dist=True, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self.test_acc1, self.test_acc5, self.test_loss)
        per_class = self.test_acc1_per_class.compute()
        self.test_acc1_per_class.reset()
        self._log_per_class(self.class_names(), per_class)

    # --- logging helpers -----------------------------------------------------------------------------------

    def class_names(self) -> list[str]:
        """The datamodule's class names (its `classes` attribute) or the class indices."""
        classes = getattr(self.trainer.datamodule, "classes", None) if self.trainer.datamodule else None
        if classes is not None and len(classes) == self.num_classes:
            return [str(c) for c in classes]
        return [str(i) for i in range(self.num_classes)]

    def _log_per_class(self, names: list[str], per_class: torch.Tensor) -> None:
        """Per-class test top-1 accuracy: a W&B table `test/per_class_acc1` (when a W&B logger is attached)
        and, up to `MAX_CLASS_SCALARS` classes, one scalar `test/acc1_class/<name>` each. Sent to the loggers
        directly (rank 0), not through `self.log`, so the printed test summary stays short."""
        from pytorch_lightning.loggers import WandbLogger

        if not self.trainer.is_global_zero:
            return
        values = per_class.tolist()
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[name, acc] for name, acc in zip(names, values)]
                logger.log_table(
                    "test/per_class_acc1", columns=["class", "acc1"], data=rows, step=self.global_step
                )
            if len(names) <= self.MAX_CLASS_SCALARS:
                logger.log_metrics(
                    {f"test/acc1_class/{name}": acc for name, acc in zip(names, values)},
                    step=self.global_step,
                )

    def log_run_facts(self) -> None:
        """Log the effective batch size, the learning rate it gives and the realised clean-label ratio."""
        values: dict[str, float] = {}
        batch = effective_batch_size(self.trainer)
        if batch is not None:
            values["trainer/effective_batch_size"] = batch
        values["trainer/lr_scaled"] = self.scaled_lr()
        datamodule = self.trainer.datamodule
        ratio = getattr(datamodule, "realised_clean_ratio", None) if datamodule is not None else None
        if ratio is not None:
            values["data/realised_clean_ratio"] = float(ratio)
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)
            logger.log_hyperparams(values)
