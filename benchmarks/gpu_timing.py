"""How the GPU command's fits of ours run and are timed: the fast path's flags, and a clock that
counts as airbench counts (training steps and the whitening initialisation, the GPU synchronised)."""

from __future__ import annotations

import time

import torch


def mixed_precision() -> str:
    """bf16 autocast where the GPU has bf16 units (Ampere and later), fp16 with loss scaling on
    older GPUs, and bf16 on a CPU (``--quick``, which runs the GPU's code paths there)."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "16-mixed"
    return "bf16-mixed"


def fast_path() -> list[str]:
    """Every fit of ours on a GPU takes the fast path: mixed precision, cuDNN autotuning (set
    explicitly, as it is for airbench), NHWC, batches made on the GPU by the tensor loader. On a
    CPU (``--quick``) the same flags run, so their code paths are exercised there."""
    return [
        f"--trainer.precision={mixed_precision()}",
        "--trainer.benchmark=true",
        "--model.channels_last=true",
        "--data.loader=tensor",
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_clock(device: torch.device):
    """A callback timing the first training batch's start to the last optimizer step's end, the GPU
    synchronised at both, plus the network's whitening initialisation (``init_from_data``): as
    airbench counts, without data loading, warm-up or evaluation. ``whiten_seconds`` is the
    initialisation's share."""
    from lightning.pytorch.callbacks import Callback

    class TrainClock(Callback):
        start = end = None
        whiten_seconds = 0.0

        def on_fit_start(self, trainer, pl_module):
            # Runs before the module's on_fit_start, which calls the initialisation: time it there.
            net = pl_module.model
            init = getattr(net, "init_from_data", None)
            if not callable(init):
                return
            clock = self

            def timed_init(images):
                _sync(device)
                start = time.perf_counter()
                init(images)
                _sync(device)
                clock.whiten_seconds += time.perf_counter() - start

            net.init_from_data = timed_init

        def seconds(self) -> float | None:
            if self.start is None or self.end is None:
                return None
            return self.end - self.start + self.whiten_seconds

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.start is None:
                _sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total = trainer.estimated_stepping_batches
            if self.end is None and total != float("inf") and trainer.global_step >= int(total):
                self.on_train_end(trainer, pl_module)

        def on_train_end(self, trainer, pl_module):
            if self.end is None:
                _sync(device)
                self.end = time.perf_counter()

    return TrainClock()
