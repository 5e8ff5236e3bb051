"""Optimizers and learning-rate schedules: ``build_optimizer`` and ``build_scheduler`` turn a
module's hyperparameters into what ``configure_optimizers`` returns.

Muon for convolution filters, SGD for everything else, in one optimizer (``MuonSGD``):

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces each filter bank's
momentum update by the nearest semi-orthogonal matrix: every direction of the update gets about
the same size, whatever the gradient's spectrum. airbench94_muon reaches airbench94's accuracy in
8 epochs instead of 9.9 with it. ``torch.optim.Muon`` takes only 2-D parameters and always
orthogonalises in bfloat16, which CPUs without bf16 units run slowly; this one reshapes conv
filters (out, in, kh, kw) to (out, in * kh * kw) and works in float32 off the GPU.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Sequence

import torch

from cifar_lightning.errors import UserError

if TYPE_CHECKING:
    import lightning.pytorch as pl

OptimizerName = Literal["sgd", "adam", "adamw", "muon", "sam"]
SamBase = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["none", "multistep", "cosine", "linear", "onecycle", "plateau"]
OPTIMIZERS = ("sgd", "adam", "adamw", "muon", "sam")
SAM_BASES = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "multistep", "cosine", "linear", "onecycle", "plateau")

#: Quintic Newton-Schulz coefficients that push singular values towards 1 fastest from near 0
#: (Jordan et al.); the iteration lands them in about [0.7, 1.2] rather than exactly on 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@functools.lru_cache(maxsize=None)
def _native_bf16(device: int | None) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U V^T`` of the SVD ``g = U S V^T`` for a 2-D ``g``, by Newton-Schulz steps.

    bfloat16 on GPUs with bf16 units (the iteration tolerates it), float32 elsewhere (CPUs, and
    GPUs before Ampere). Returns ``g``'s dtype.
    """
    if g.ndim != 2:
        raise ValueError(f"orthogonalize needs a 2-D tensor, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda and _native_bf16(g.device.index) else torch.float32)
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Muon on the parameter groups with ``muon=True``, Nesterov/heavy-ball SGD on the others.

    Muon groups: ``buf = momentum * buf + grad``; the update is ``grad + momentum * buf``
    (Nesterov) or ``buf``, reshaped to (rows, rest) and orthogonalised, times ``lr``. With
    ``normalize=True`` (airbench94_muon) the weight is first rescaled to a Frobenius norm of
    sqrt(rows): the filters feed BatchNorm, which ignores their scale, so only their direction
    is learnt and the step size relative to the weight stays fixed. Weight decay is coupled.

    SGD groups follow ``torch.optim.SGD`` (coupled weight decay, dampening 0).

    Args:
        params: parameters or parameter groups; a group's ``muon`` key picks its rule (default False).
        lr, momentum, nesterov, weight_decay: defaults for every group.
        ns_steps: Newton-Schulz iterations per Muon update.
        normalize: rescale Muon weights to a fixed norm before each update.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 3,
        normalize: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            normalize=normalize,
            muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices or conv filters (2-D or more), not vectors")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            # Each elementwise operation runs once over the group's tensors (torch._foreach_*),
            # with the same arithmetic as one call per tensor: a step's Python time no longer
            # grows with the number of parameters.
            grads = [p.grad for p in params]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if momentum:
                bufs = [self.state[p].get("momentum_buffer") for p in params]
                if any(b is None for b in bufs):  # the first step: the buffers start as the gradients
                    bufs = [g.detach().clone() if b is None else b.mul_(momentum).add_(g) for b, g in zip(bufs, grads)]
                    for p, b in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = b
                else:
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads)
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            if group["muon"]:
                if group["normalize"]:
                    for p in params:
                        p.mul_(p.shape[0] ** 0.5 / p.norm().clamp_min(1e-12))
                grads = [
                    orthogonalize(g.reshape(p.shape[0], -1), group["ns_steps"]).view_as(p)
                    for p, g in zip(params, grads)
                ]
            torch._foreach_add_(params, grads, alpha=-lr)
        return loss


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al. 2021, arXiv:2010.01412) around a base optimizer;
    with ``adaptive``, ASAM (Kwon et al. 2021, arXiv:2102.11600).

    Each step takes the closure Lightning passes to ``step`` and runs it twice: at the weights
    ``w``, for the gradient ``g``, then at ``w + e``, ``e = rho * g / ||g||`` (ASAM: ``e = rho *
    w² g / ||w g||``, element-wise), for the gradient that the base optimizer then applies to
    ``w``. Under DDP each backward pass all-reduces its gradients, as any backward does.

    - BatchNorm statistics (``norm_modules``) come from the first pass only: the second one's
      updates of the running statistics are undone.
    - ``perturbed`` is True during the second pass, so that the module counts each batch once in
      its training metrics. Callbacks that read a step's loss (the loss guard) see the second
      pass's, at the perturbed weights.
    - The param groups are the base optimizer's own (schedules change its learning rates), and the
      state in a checkpoint is the base optimizer's: ``e`` lives only within a step.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        norm_modules: Sequence[torch.nn.Module] = (),
    ) -> None:
        if not rho > 0:
            raise UserError(f"sam_rho must be positive, got {rho}. Try 0.05 (SAM) or 2.0 (ASAM).")
        # The base optimizer's defaults too: a schedule that cycles momentum looks for them there.
        super().__init__(base.param_groups, {**base.defaults, "rho": rho, "adaptive": adaptive})
        self.base = base
        self.param_groups = base.param_groups
        self.rho, self.adaptive = rho, adaptive
        self.norm_modules = list(norm_modules)
        self.perturbed = False

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SAM needs the closure that recomputes the loss and its gradients")
        loss = torch.enable_grad()(closure)()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = self.rho / (norm + 1e-12)
        originals = [p.detach().clone() for p in params]
        for p in params:
            p.add_((p * p * p.grad) * scale if self.adaptive else p.grad * scale)
        statistics = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False)} for m in self.norm_modules]
        self.perturbed = True
        try:
            torch.enable_grad()(closure)()
        finally:
            self.perturbed = False
            for p, original in zip(params, originals):
                p.copy_(original)
            for m, saved in zip(self.norm_modules, statistics):
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(saved[k])
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


def muon_param_groups(module: torch.nn.Module, muon_lr: float, muon_momentum: float) -> list[dict[str, Any]]:
    """Conv filters (4-D trainable weights) in a Muon group; every other trainable tensor in an
    SGD group with the optimizer's defaults (biases, norms and linear layers, the head included:
    Muon is meant for hidden filters, not for the classifier)."""
    conv = [p for p in module.parameters() if p.requires_grad and p.ndim == 4]
    rest = [p for p in module.parameters() if p.requires_grad and p.ndim != 4]
    groups = [{"params": conv, "lr": muon_lr, "momentum": muon_momentum, "weight_decay": 0.0, "muon": True}]
    return [g for g in groups if g["params"]] + ([{"params": rest}] if rest else [])


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: classes rather than lambdas, so that LambdaLR pickles into checkpoints
# ---------------------------------------------------------------------------------------------


class PiecewiseConstant:
    """LR multiplier ``factors[i]`` from ``milestones[i]`` on (``initial`` before the first one)."""

    def __init__(self, milestones: Sequence[int], factors: Sequence[float], initial: float = 1.0) -> None:
        self.milestones = list(milestones)
        self.factors = list(factors)
        self.initial = initial

    def __call__(self, step: int) -> float:
        factor = self.initial
        for milestone, f in zip(self.milestones, self.factors):
            if step >= milestone:
                factor = f
        return factor


class Resizable:
    """A per-step schedule whose rest can be fitted into another number of steps.

    A run resumed with another number of steps per epoch (another world size, batch size or
    ``--epochs``) keeps the schedule's shape over its epochs: from the resumed step on, each real
    step moves the schedule on by ``rate`` of its own steps, so that it ends where the new run
    ends. These attributes are in the scheduler's state, so a second resume continues from them.
    """

    origin_step: int = 0  # the real step where the current rate began
    origin: float = 0.0  # the schedule's own step there
    rate: float = 1.0  # schedule steps per real step
    total: int

    def position(self, step: float) -> float:
        """The schedule's own step at real step ``step``."""
        return self.origin + (step - self.origin_step) * self.rate

    def end(self) -> float:
        """The real step at which the schedule ends (where it ended, once it has)."""
        if self.rate <= 0:
            return float(self.origin_step)
        return self.origin_step + (self.total - self.origin) / self.rate

    def resize(self, step: int, total: int) -> None:
        """Spread what is left of the schedule after real step ``step`` over ``total - step`` steps."""
        here = self.position(step)
        self.origin_step, self.origin = step, here
        self.rate = max(self.total - here, 0.0) / max(total - step, 1)


class WarmupCosine(Resizable):
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""

    def __init__(self, warmup: int, total: int, floor: float = 0.0) -> None:
        self.warmup, self.total, self.floor = warmup, max(total, 1), floor

    def __call__(self, step: int) -> float:
        step = self.position(step)
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * self.decay(progress)

    @staticmethod
    def decay(progress: float) -> float:
        """Share of the way from ``floor`` to the peak left at ``progress`` (0 -> 1) after warm-up."""
        return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupPiecewise(Resizable, PiecewiseConstant):
    """``PiecewiseConstant`` over steps after a linear warm-up over the first ``warmup`` steps
    (weiaicunzai/pytorch-cifar100's one warm-up epoch before its step decay), sized for a run of
    ``total`` steps. It is ``Resizable``: a run resumed with another number of steps per epoch and
    the same epochs keeps its milestones at their epochs; one resumed with more epochs stretches
    what is left of the schedule over them, as the per-step schedules do (an epoch-counted
    multistep without warm-up would keep its milestones' epochs)."""

    def __init__(
        self, milestones: Sequence[int], factors: Sequence[float], initial: float, warmup: int, total: int
    ) -> None:
        PiecewiseConstant.__init__(self, milestones, factors, initial)
        self.warmup, self.total = warmup, max(total, 1)

    def __call__(self, step: int) -> float:
        step = self.position(step)
        ramp = (step + 1) / self.warmup if step < self.warmup else 1.0
        return ramp * PiecewiseConstant.__call__(self, step)


class WarmupLinear(WarmupCosine):
    """LR multiplier: linear warm-up over ``warmup`` steps, then a straight line to ``floor`` at ``total``."""

    @staticmethod
    def decay(progress: float) -> float:
        return 1.0 - progress


class ResizableOneCycleLR(Resizable, torch.optim.lr_scheduler.OneCycleLR):
    """torch's ``OneCycleLR``, resizable like the other per-step schedules (``Resizable``)."""

    @property
    def total(self) -> int:  # type: ignore[override]
        return self.total_steps

    def get_lr(self) -> list[float]:
        real = self.last_epoch
        # Its last step is total_steps - 1, the bottom of the final annealing; beyond, it would rise.
        self.last_epoch = min(self.position(real), self.total_steps - 1)  # type: ignore[assignment]
        try:
            return super().get_lr()
        finally:
            self.last_epoch = real


def fit_schedules(schedulers: Iterable[Any], step: int, total: int) -> list[tuple[float, int]]:
    """Resize each resizable schedule of ``schedulers`` that would not end at real step ``total``
    (see ``Resizable``) to end there, from ``step`` on; returns (old end, new end) of each. A
    schedule that has already ended is left so."""
    changed = []
    for sched in schedulers:
        shapes = getattr(sched, "lr_lambdas", None) or [sched]
        for shape in shapes:
            if not isinstance(shape, Resizable) or total <= step or shape.position(step) >= shape.total:
                continue  # not resizable, nothing left to run, or a schedule that has ended
            if abs(shape.end() - total) >= 0.5:
                changed.append((shape.end(), total))
                shape.resize(step, total)
    return changed


# ---------------------------------------------------------------------------------------------
# From hyperparameters to optimizer and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``hp["optimizer"]`` names, over ``model``'s trainable parameters.

    ``hp`` holds ``ClassifierModule``'s hyperparameters (lr, momentum, nesterov, weight_decay,
    betas, muon_lr, muon_momentum, sam_base, sam_rho, sam_adaptive).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    name = hp["optimizer"]
    if name == "sam":
        base = build_optimizer(model, {**hp, "optimizer": hp["sam_base"]})
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        return SAM(base, rho=hp["sam_rho"], adaptive=hp["sam_adaptive"], norm_modules=norms)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"], weight_decay=hp["weight_decay"]
        )
    if name == "muon":
        groups = muon_param_groups(model, hp["muon_lr"], hp["muon_momentum"])
        return MuonSGD(
            groups, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"], weight_decay=hp["weight_decay"]
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"])
    raise UserError(f"unknown optimizer {name!r}. Valid names: {', '.join(OPTIMIZERS)}")


def _steps_per_epoch(trainer: Any) -> float:
    """Optimizer steps in one epoch: the loader's real batches, else the run's steps over its epochs."""
    total = trainer.estimated_stepping_batches  # sets up the training loader: its length is known after
    if not math.isfinite(total):
        raise UserError("a per-step schedule needs a run of known length: set max_epochs or max_steps.")
    batches = trainer.num_training_batches
    if isinstance(batches, int) and batches > 0:
        return math.ceil(batches / trainer.accumulate_grad_batches)
    return total / max(1, trainer.max_epochs or 1)


def build_scheduler(opt: torch.optim.Optimizer, hp: Mapping[str, Any], trainer: Any) -> Any:
    """What ``configure_optimizers`` returns for ``opt`` and the schedule ``hp["scheduler"]`` names.

    Per-step schedules (``cosine``, ``linear``, ``onecycle``) take their length from
    ``trainer.estimated_stepping_batches``; warm-up epochs count the loader's real steps, so they
    keep their meaning when ``max_steps`` cuts a run short.
    """
    name = hp["scheduler"]
    if name == "none":
        return opt
    if name == "plateau":
        mode = "min" if "loss" in hp["plateau_monitor"] else "max"
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=mode, factor=hp["plateau_factor"], patience=hp["plateau_patience"], min_lr=hp["min_lr"]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": hp["plateau_monitor"]}}
    if name == "multistep":
        milestones, gamma = hp["milestones"], hp["gamma"]
        gammas = gamma if isinstance(gamma, (list, tuple)) else [gamma ** (i + 1) for i in range(len(milestones))]
        if len(gammas) != len(milestones):
            raise UserError(f"gamma has {len(gammas)} factors for {len(milestones)} milestones.")
        unit = hp["milestone_unit"]
        if hp["warmup_epochs"] > 0:  # a per-step warm-up: the milestones are counted in steps too
            per_epoch = _steps_per_epoch(trainer)
            steps = milestones if unit == "step" else [round(m * per_epoch) for m in milestones]
            warmup = max(1, round(hp["warmup_epochs"] * per_epoch))
            rule = WarmupPiecewise(
                steps, gammas, hp["initial_lr_factor"], warmup, int(trainer.estimated_stepping_batches)
            )
            unit = "step"
        else:
            rule = PiecewiseConstant(milestones, gammas, hp["initial_lr_factor"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": unit}}
    total = int(trainer.estimated_stepping_batches)
    if name == "onecycle":
        pct_start = hp["pct_start"]
        if total >= 2 and pct_start * total < 2:
            # torch's OneCycleLR divides by zero when its warm-up ends on the first step (pct_start x
            # steps = 1). A run this short (fast_dev_run, a smoke check) warms up over 1.5 steps.
            pct_start = 1.5 / total
        # Each group peaks at its own learning rate (Muon's filters at muon_lr, not the SGD lr).
        # Momentum cycles 0.85-0.95 as torch's default, except in Muon groups, whose momentum is
        # part of the update rule (muon_momentum) and stays fixed.
        muon = [bool(g.get("muon")) for g in opt.param_groups]
        base = [g["momentum"] if m else 0.85 for g, m in zip(opt.param_groups, muon)]
        peak = [g["momentum"] if m else 0.95 for g, m in zip(opt.param_groups, muon)]
        sched = ResizableOneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total,
            pct_start=pct_start,
            base_momentum=base,
            max_momentum=peak,
        )
    elif name in ("cosine", "linear"):
        warmup = int(round(hp["warmup_epochs"] * _steps_per_epoch(trainer)))
        shape = WarmupLinear if name == "linear" else WarmupCosine
        sched = torch.optim.lr_scheduler.LambdaLR(opt, shape(warmup, total, hp["min_lr"] / hp["lr"]))
    else:
        raise UserError(f"unknown scheduler {name!r}. Valid names: {', '.join(SCHEDULERS)}")
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_sam_trainer(trainer: pl.Trainer | None) -> None:
    """SAM runs the closure itself, twice per step: it cannot work where Lightning calls it instead."""
    if trainer is None:
        return
    if str(trainer.precision) == "16-mixed":
        raise UserError(
            "--optimizer sam cannot run with 16-bit mixed precision: its gradient scaler runs the "
            "training step itself, once. Use --precision bf16-mixed or 32."
        )
    if trainer.accumulate_grad_batches > 1:
        raise UserError("--optimizer sam takes one batch per step: drop --trainer.accumulate_grad_batches.")


def steps_left(trainer: pl.Trainer, batch_idx: int) -> int | None:
    """Optimizer steps from ``batch_idx`` of the current epoch to the end of the fit; None when
    the run has no set end (no epoch or step limit, or an endless loader)."""
    batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
    by_steps = trainer.max_steps - trainer.global_step if trainer.max_steps > 0 else None
    if not math.isfinite(batches) or trainer.max_epochs is None or trainer.max_epochs < 0:
        return by_steps
    per_epoch = math.ceil(batches / accumulate)
    # Steps already taken in this epoch, counted as the epoch's batches (a group of accumulated
    # batches cut short by a stop is counted as begun).
    left = per_epoch - batch_idx // accumulate + (trainer.max_epochs - trainer.current_epoch - 1) * per_epoch
    return left if by_steps is None else min(left, by_steps)
