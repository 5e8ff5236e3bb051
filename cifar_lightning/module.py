"""ClassifierModule: any registered architecture with its metrics; optimizer and schedule from ``optim``."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from cifar_lightning.constants import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE
from cifar_lightning.data.transforms import normalize
from cifar_lightning.errors import UserError
from cifar_lightning.metrics import evaluation_metrics
from cifar_lightning.models import check_input_size, create_model, model_info
from cifar_lightning.models.pretrained import fresh_head_note, load_weights, weights_entry
from cifar_lightning.optim import (
    OPTIMIZERS,
    SAM,
    SAM_BASES,
    SCHEDULERS,
    OptimizerName,
    SamBase,
    SchedulerName,
    build_optimizer,
    build_scheduler,
    check_sam_trainer,
    fit_schedules,
    steps_left,
)
from cifar_lightning.tta import TTA_MODES, TTAMode, tta_logits

STAGES = ("train", "val", "test")


def _as_list(value: Any) -> Any:  # tuples and lists compare alike (checkpoints hold lists)
    return list(value) if isinstance(value, (list, tuple)) else value


class ClassifierModule(pl.LightningModule):
    """Image classifier around any network of the registry.

    Every argument is saved in the checkpoint, together with the class names and the
    normalisation of the data it was trained on, so ``ClassifierModule.load_from_checkpoint(path)``
    rebuilds the model with no other input.

    Args:
        arch: registered architecture name (see ``cifar_lightning.models.list_models()``).
        arch_kwargs: extra keyword arguments for the architecture's builder.
        pretrained: start from the arch's shipped weights (``cifar_lightning/weights/``, checked by
            sha256); for another number of classes the classifier starts afresh, and one line says so.
        num_classes: number of output classes (linked from the data).
        class_names: one name per class, in label order (linked from the data).
        norm_mean, norm_std: input normalisation the network expects (linked from the data).
        superclass_names, superclasses: the groups of classes (CIFAR-100's 20 superclasses) and the
            group of each class, in label order (linked from the data; None without groups).
            Validation and test then also log ``acc_superclass``: a prediction counts when it
            falls in the true class's group.
        image_size: side in pixels of the input images (linked from the data; CIFAR's 32). A
            network that cannot take it (a fixed-size head) is refused here, with the reason.
        optimizer: ``sgd`` (with ``momentum`` and ``nesterov``), ``adam``, ``adamw``, ``sam`` or ``muon``
            (conv filters by Muon at ``muon_lr`` and ``muon_momentum``, everything else by SGD
            with ``lr``, ``momentum``, ``nesterov`` and ``weight_decay``; see ``optim.MuonSGD``).
        lr: peak learning rate. weight_decay: L2 penalty (decoupled for ``adamw``).
        muon_lr, muon_momentum: Muon's peak step size (relative to the filters' norm) and momentum;
            the schedule scales ``muon_lr`` as it scales ``lr``.
        sam_base, sam_rho, sam_adaptive: with ``optimizer="sam"``, the optimizer SAM wraps
            (``sgd``, ``adam``, ``adamw``, with the settings above), the radius of its weight
            perturbation, and ASAM's scale-invariant perturbation (see ``optim.SAM``). Each step
            costs two forward and backward passes.
        betas: Adam/AdamW betas.
        scheduler: ``none``, ``multistep``, ``cosine``, ``linear`` (decay to ``min_lr`` at the last
            step), ``onecycle`` or ``plateau``.
        milestones: ``multistep`` boundaries, in epochs or steps (``milestone_unit``).
        gamma: ``multistep`` factor per milestone, or a list of absolute factors (one per milestone).
        initial_lr_factor: ``multistep`` factor before the first milestone (a constant warm-up,
            as ResNet-110's 0.01 start in He et al. 2016).
        pct_start: ``onecycle`` share of steps spent warming up.
        warmup_epochs: linear warm-up before ``cosine``, ``linear`` or ``multistep`` (may be fractional;
            ``multistep`` then counts its milestones in steps).
        min_lr: floor of ``cosine``, ``linear`` and ``plateau``.
        plateau_monitor, plateau_factor, plateau_patience: ReduceLROnPlateau settings.
        label_smoothing: cross-entropy label smoothing.
        channels_last: run the network in channels-last memory format (faster convs on GPUs).
        compile: wrap the network in ``torch.compile``. compile_backend: its backend (``eager``
            captures the graphs without generating code: a quick check of a network on a CPU).
        tta: test-time augmentation of validation and test batches (see ``tta_logits``).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        arch_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        norm_mean: tuple[float, float, float] = CIFAR10_MEAN,
        norm_std: tuple[float, float, float] = CIFAR10_STD,
        superclass_names: list[str] | None = None,
        superclasses: list[int] | None = None,
        image_size: int = IMAGE_SIZE,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        muon_lr: float = 0.24,
        muon_momentum: float = 0.6,
        sam_base: SamBase = "sgd",
        sam_rho: float = 0.05,
        sam_adaptive: bool = False,
        scheduler: SchedulerName = "cosine",
        milestones: list[int] | None = None,
        milestone_unit: Literal["epoch", "step"] = "epoch",
        gamma: float | list[float] = 0.1,
        initial_lr_factor: float = 1.0,
        pct_start: float = 0.25,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        plateau_monitor: str = "val/loss",
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        tta: TTAMode = "none",
    ) -> None:
        super().__init__()
        model_info(arch)  # unknown names fail here with the list of valid ones
        if optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {optimizer!r}. Valid names: {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}. Valid names: {', '.join(SCHEDULERS)}")
        if not lr > 0:
            raise UserError(f"the learning rate must be positive, got {lr}. Pass e.g. --lr 0.1.")
        if optimizer == "sam" and sam_base not in SAM_BASES:
            raise UserError(f"unknown sam_base {sam_base!r}. Valid names: {', '.join(SAM_BASES)}")
        if optimizer == "sam" and not sam_rho > 0:
            raise UserError(f"sam_rho must be positive, got {sam_rho}. Try 0.05 (SAM) or 2.0 (ASAM, --sam-adaptive).")
        if optimizer == "muon" and not muon_lr > 0:
            raise UserError(f"muon_lr must be positive, got {muon_lr}. Pass e.g. --model.muon_lr 0.24.")
        if num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {num_classes}.")
        if class_names is None:
            class_names = list(CIFAR10_CLASSES) if num_classes == 10 else [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise UserError(f"{len(class_names)} class names given for num_classes={num_classes}.")
        if (superclasses is None) != (superclass_names is None):
            raise UserError("superclasses and superclass_names go together: give both or neither.")
        if superclasses is not None and (
            len(superclasses) != num_classes or not all(0 <= g < len(superclass_names) for g in superclasses)
        ):
            raise UserError(
                f"superclasses must give each of the {num_classes} classes a group index below "
                f"{len(superclass_names)}, got {len(superclasses)} entries."
            )
        if tta not in TTA_MODES:
            raise UserError(f"unknown tta {tta!r}. Valid names: {', '.join(TTA_MODES)}")
        if scheduler == "multistep" and not milestones:
            raise UserError("scheduler 'multistep' needs milestones, e.g. --model.milestones [100,150].")
        self.save_hyperparameters()
        self.class_names = list(class_names)
        #: Images of the latest training, validation and test epoch, over all ranks ("train", "val", "test").
        self.images_seen: dict[str, int] = {}
        self.model = create_model(arch, num_classes=num_classes, **(arch_kwargs or {}))
        if pretrained:
            fresh = load_weights(self.model, arch)
            if fresh:
                rank_zero_info(fresh_head_note(arch, fresh, weights_entry(arch)["num_classes"], num_classes))
        if image_size != IMAGE_SIZE:
            check_input_size(self.model, arch, image_size)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Lets the model summary show shapes and TensorBoard draw the graph (log_graph=True). Not
        # for a compiled network: the summary's batch of 1, in eval mode, would compile a graph
        # of its own before training starts.
        self.example_input_array = None if compile else torch.zeros(1, 3, image_size, image_size)
        # Kept out of the module tree so the state dict has one copy of the weights, not two.
        # Static shapes: the training batch runs the kernels compiled for its size (what the GPU
        # command times); a smaller last batch gets its own graph, once, instead of turning every
        # later step into a dynamic-shape one.
        object.__setattr__(
            self,
            "_forward",
            torch.compile(self.model, dynamic=False, backend=compile_backend) if compile else self.model,
        )

        # One metric object per evaluation stage and figure (``metrics.evaluation_metrics``).
        self.loss_metrics, self.acc_metrics, self.class_acc_metrics, self.top5_metrics, self.super_acc_metrics = (
            evaluation_metrics(num_classes, len(superclass_names) if superclasses is not None else 0)
        )
        # Training: the epoch's loss sum and correct predictions on the device, one in-place add a
        # step, and the image count on the host; summed over the ranks once, at the epoch's end
        # (``_log_train_epoch``). torchmetrics' objects cost about 20 small operations a step here.
        self.register_buffer("_train_totals", torch.zeros(2), persistent=False)
        self._train_count = 0
        self._train_logged = False
        self._logged_stages: set[str] = set()  # stages whose metric objects this epoch has logged
        self._fit_schedules_at_first_batch = False
        self._planned_steps: int | None = None
        self._sam: SAM | None = None
        # Not in the state dict: the hyperparameters hold it, and old checkpoints lack the key.
        self.register_buffer(
            "_group_of",
            torch.tensor(superclasses if superclasses is not None else [], dtype=torch.long),
            persistent=False,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets ``_current_fx_name`` (a string or None) before and after each hook of a
        # step, dozens of times a step; nn.Module's __setattr__ would look it up among the
        # parameters, buffers and submodules each time: Python work on every short step.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised images (B, 3, H, W)."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images in [0, 1], (B, 3, H, W), normalised as the data the model was trained on."""
        return normalize(x, self.hparams.norm_mean, self.hparams.norm_std)

    def tta_logits(self, x: torch.Tensor, mode: TTAMode | None = None) -> torch.Tensor:
        """Logits averaged over test-time views of normalised images (B, 3, H, W) (``tta.tta_logits``);
        ``mode`` defaults to the module's ``tta``."""
        return tta_logits(self, x, self.hparams.get("tta", "none") if mode is None else mode)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities for normalised images."""
        return torch.softmax(self(x).float(), dim=1)

    # -- steps ------------------------------------------------------------------------------------
    def _shared_step(self, batch, stage: str) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x) if stage == "train" else self.tta_logits(x)
        # y is labels, or (B, classes) probabilities for a MixUp / CutMix training batch: the loss
        # trains on them, and accuracy counts against the dominant label.
        losses = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing, reduction="none")
        loss = losses.mean()
        preds = logits.detach().argmax(dim=1)
        y = y.argmax(dim=1) if y.is_floating_point() else y
        # Metric objects accumulate on the device; Lightning computes and syncs them once per epoch.
        # Per-sample losses, so that a smaller last batch weighs less (torchmetrics 1.9 drops the
        # ``weight`` argument when its NaN check is disabled).
        key = f"{stage}_"
        if stage == "train":
            # SAM's second pass over the same batch, at perturbed weights: counted once, in the first.
            if not getattr(self._sam, "perturbed", False):
                self._train_totals += torch.stack((losses.detach().sum(), (preds == y).sum().to(losses.dtype)))
                self._train_count += len(y)
            return {"loss": loss, "logits": logits.detach(), "targets": y}
        self.loss_metrics[key].update(losses.detach())
        self.acc_metrics[key].update(preds, y)
        if key in self.class_acc_metrics:
            self.class_acc_metrics[key].update(preds, y)
        if key in self.top5_metrics:
            self.top5_metrics[key].update(logits.detach(), y)
        if key in self.super_acc_metrics:
            self.super_acc_metrics[key].update(self._group_of[preds], self._group_of[y])
        if stage not in self._logged_stages:
            # Lightning keeps a reference to a logged metric object and computes it at the epoch's
            # end, so one call per epoch logs all of its batches. A call per step costs Python time
            # that shows on a short step (the overhead section of benchmarks/cpu.json).
            self.log(f"{stage}/loss", self.loss_metrics[key], on_step=False, on_epoch=True, prog_bar=stage == "train")
            self.log(f"{stage}/acc", self.acc_metrics[key], on_step=False, on_epoch=True, prog_bar=True)
            if key in self.top5_metrics:
                self.log(f"{stage}/acc_top5", self.top5_metrics[key], on_step=False, on_epoch=True)
            if key in self.super_acc_metrics:
                self.log(f"{stage}/acc_superclass", self.super_acc_metrics[key], on_step=False, on_epoch=True)
            self._logged_stages.add(stage)
        return {"loss": loss, "logits": logits.detach(), "targets": y}

    def training_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        # The loss, and the step's logits and targets (detached) for callbacks that look at them.
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        # Callbacks (prediction tables, confusion matrices) read logits and targets from here.
        return self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predict_proba(x)

    def _log_per_class(self, stage: str) -> None:
        metric = self.class_acc_metrics[f"{stage}_"]
        values = metric.compute()  # synced across processes by torchmetrics
        metric.reset()
        self.log_dict(
            {f"{stage}/acc/{name}": v for name, v in zip(self.class_names, values)},
            # compute() already returned the global value on every rank: sync_dist says so, and
            # rank_zero_only keeps Lightning from reducing it again (two all-reduces per class).
            sync_dist=True,
            rank_zero_only=True,
        )

    def _count_images(self, stage: str) -> None:
        # The loss metric's weight is the number of per-sample losses it averaged on this rank;
        # one collective per epoch sums the ranks. A run that limits its batches sees fewer.
        count = self.loss_metrics[f"{stage}_"].weight.detach().clone()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.images_seen[stage] = int(count.item())

    def _log_train_epoch(self) -> None:
        """Log the epoch's training loss and accuracy: the running totals summed over the ranks,
        divided by the images they took (each once, as the logged means always counted them)."""
        totals = torch.cat((self._train_totals, self._train_totals.new_tensor([self._train_count])))
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, correct, count = totals.tolist()
        self._train_logged = True
        self.images_seen["train"] = int(count)
        if count:
            # Already summed over the ranks: nothing for Lightning to synchronise.
            self.log("train/loss", loss_sum / count, on_step=False, on_epoch=True, prog_bar=True)
            self.log("train/acc", correct / count, on_step=False, on_epoch=True, prog_bar=True)

    def running_metrics(self, stage: str = "train") -> dict[str, float]:
        """Mean loss and accuracy of ``stage`` so far in this epoch, on this process: read in one
        transfer, with no synchronisation between processes (one rank may call it alone). Empty
        before the epoch's first batch. For a live display; the logged epoch values are summed
        over the ranks."""
        if stage == "train":
            if not self._train_count:
                return {}
            loss_sum, correct = self._train_totals.tolist()
            return {"train/loss": loss_sum / self._train_count, "train/acc": correct / self._train_count}
        loss = self.loss_metrics[f"{stage}_"].metric_state
        acc = self.acc_metrics[f"{stage}_"].metric_state
        total, count, correct, seen = torch.stack(
            [
                loss["mean_value"].float(),
                loss["weight"].float(),
                acc["tp"].sum().float(),
                (acc["tp"] + acc["fn"]).sum().float(),
            ]
        ).tolist()
        if count == 0 or seen == 0:
            return {}
        return {f"{stage}/loss": total / count, f"{stage}/acc": correct / seen}

    def on_train_epoch_start(self) -> None:
        self._train_totals.zero_()
        self._train_count, self._train_logged = 0, False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # At the epoch's last batch, before the callbacks' on_train_epoch_end (the per-epoch lines,
        # checkpointing), which Lightning calls ahead of the module's own and which read the values.
        trainer = self.trainer
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last or (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps):
            self._log_train_epoch()

    def on_train_epoch_end(self) -> None:
        if not self._train_logged:  # an epoch cut short (a stop, a step budget): what it took
            self._log_train_epoch()

    def on_validation_epoch_start(self) -> None:
        self._logged_stages.discard("val")

    def on_test_epoch_start(self) -> None:
        self._logged_stages.discard("test")

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val")
        if not self.trainer.sanity_checking:
            self._count_images("val")

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test")
        self._count_images("test")

    def on_train_start(self) -> None:
        # The sanity check leaves partial validation state behind; start the real epochs clean.
        for metrics in (self.loss_metrics, self.acc_metrics, self.class_acc_metrics):
            metrics["val_"].reset()
        # Resumed: see on_train_batch_start.
        self._fit_schedules_at_first_batch = self.trainer.global_step > 0
        self._planned_steps = None

    @property
    def planned_steps(self) -> int:
        """The optimizer step at which this fit ends: the trainer's estimate, or, in a resumed run
        with another number of steps per epoch, the steps before the resume plus those left."""
        if self._planned_steps is not None:
            return self._planned_steps
        return int(self.trainer.estimated_stepping_batches)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._fit_schedules_at_first_batch:
            return
        self._fit_schedules_at_first_batch = False
        # With another world size (or batch size, or --epochs) than the run it resumes, an epoch
        # has another number of steps, and a per-step schedule restored as saved would end too
        # early or too late. What is left of it is spread over the steps this run has left.
        trainer = self.trainer
        step, left = trainer.global_step, steps_left(trainer, batch_idx)
        if left is None:
            return
        total = self._planned_steps = step + left
        step_schedules = [c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step"]
        for old, new in fit_schedules(step_schedules, step, total):
            rank_zero_info(
                f"resumed at step {step}, with {total - step} steps left: the learning-rate schedule, "
                f"which would have ended at step {old:.0f}, now ends at step {new}"
            )

    def on_fit_start(self) -> None:
        self._adopt_data_normalisation(getattr(self.trainer, "datamodule", None))
        # Networks with data-dependent initialisation (fastnet's whitening layer) get it here, from
        # the same deterministic images on every rank; the network ignores repeated calls.
        if not callable(getattr(self.model, "init_from_data", None)) or bool(
            getattr(self.model, "whiten_initialized", False)
        ):
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "sample_train_images"):
            # Training on would leave the whitening filters random and frozen: a network that
            # learns, slowly, far below what it should reach, and says nothing.
            raise UserError(
                f"{self.hparams.arch} sets its first layer from training images before it trains, and this "
                "fit has no CIFAR10DataModule to take them from. Pass datamodule=CIFAR10DataModule(...) to "
                "Trainer.fit, or call model.model.init_from_data(images) first with about 5,000 normalised "
                "training images (N, 3, 32, 32)."
            )
        self.init_network_from(dm)

    def _adopt_data_normalisation(self, dm: Any) -> None:
        """A model built by hand beside a data module keeps its defaults (CIFAR-10's statistics and
        names, 32 px) where the CLI would have linked the data's: the model takes the data's
        normalisation, image size and class names, so that its checkpoint, evaluate
        and predict read images as training did. Another class count is an error (the network's
        head is built for its own)."""
        if dm is None or not hasattr(dm, "norm_mean"):
            return
        hp, changed = self.hparams, []
        if getattr(dm, "num_classes", hp.num_classes) != hp.num_classes:
            raise UserError(
                f"the model was built for {hp.num_classes} classes, but the data has {dm.num_classes}: build it with "
                "num_classes=dm.num_classes, class_names=dm.class_names (the CLI links them itself)."
            )
        data = {
            "norm_mean": tuple(dm.norm_mean),
            "norm_std": tuple(dm.norm_std),
            "image_size": getattr(dm, "image_size", hp.get("image_size", IMAGE_SIZE)),
            "class_names": list(getattr(dm, "class_names", self.class_names)),
        }
        for key, value in data.items():
            ours = hp.get(key, IMAGE_SIZE if key == "image_size" else None)
            if _as_list(ours) != _as_list(value):
                changed.append(key)
                if key == "image_size":
                    check_input_size(self.model, hp.arch, value)
                    if self.example_input_array is not None:
                        self.example_input_array = torch.zeros(1, 3, value, value)
                hp[key] = value
        self.class_names = list(hp.get("class_names") or self.class_names)
        if changed:
            rank_zero_info(
                f"the model takes the data module's {', '.join(changed)} (built without them); its checkpoint records "
                "them. Build it with the data module's values to say so yourself."
            )

    def init_network_from(self, datamodule: Any) -> None:
        """Data-dependent initialisation (fastnet's whitening layer) from 5,000 of the data module's
        training images; under DDP every rank then takes rank 0's (computed apart, they may differ)."""
        init = getattr(self.model, "init_from_data", None)
        if callable(init):
            init(datamodule.sample_train_images(5000).to(self.device))
            if self._trainer is not None and self._trainer.world_size > 1:
                state = {k: v.cpu() for k, v in self.model.state_dict().items()}  # pickled GPU tensors stay on GPU 0
                self.model.load_state_dict(self._trainer.strategy.broadcast(state, src=0))

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.hparams)
        if isinstance(opt, SAM):
            check_sam_trainer(self._trainer)
            self._sam = opt
        # Per-step schedules size themselves from the trainer (epochs, data, devices, accumulation).
        return build_scheduler(opt, self.hparams, self._trainer)  # None outside a fit: per-step schedules need one
