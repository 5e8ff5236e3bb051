"""The tensor path: whole batches gathered, augmented and normalised as tensors, on the training device.

``TensorLoader`` gathers a batch of uint8 images with one indexing operation and crops, flips and
normalises it as one tensor (the array moves to the GPU once when training runs on one). No
workers, no per-image Python: what airbench (https://github.com/KellerJordan/cifar10-airbench)
does to feed a GPU at tens of thousands of images per second.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from cifar_lightning.constants import CIFAR10_MEAN, CIFAR10_STD
from cifar_lightning.data.policies import OPERATIONS, BatchPolicy
from cifar_lightning.data.transforms import (
    AUGMENT_PRESETS,
    POLICIES,
    AugmentPreset,
    cutout_,
    on_device,
    random_crop_flip,
    random_erasing_,
    to_input,
)

FlipMode = Literal["random", "alternating"]


@contextmanager
def _single_threaded(enabled: bool):
    """Run the enclosed CPU tensor operations on one thread, then restore the thread count."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mix_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from several integers (base seed, rank, epoch, purpose)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0]) >> 1


class EpochShards:
    """Which items one process sees in one epoch, as a tensor of positions.

    For training (``pad=True``) this is ``torch.utils.data.DistributedSampler``'s rule, computed as
    one tensor: every epoch a permutation seeded by ``seed + epoch`` (the same on every rank),
    padded by repeating its start to a multiple of ``num_replicas``, and every
    ``num_replicas``-th item from ``rank`` on. Ranks get disjoint shards of equal length, so they
    take the same number of steps. For evaluation (``pad=False``, no shuffle) nothing is repeated
    and shards may differ by one item, as with Lightning's ``UnrepeatedDistributedSampler``.
    """

    def __init__(
        self, n: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, pad: bool = True, seed: int = 0
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.pad, self.seed = shuffle, pad, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.num_replicas)
        return len(range(self.rank, self.n, self.num_replicas))

    def positions(self, epoch: int | None = None) -> torch.Tensor:
        """int64 positions in [0, n) for this rank and ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.n)
        if self.pad:
            total = len(self) * self.num_replicas
            order = order.repeat(math.ceil(total / self.n))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.positions().tolist())


class TensorLoader:
    """Batches of a uint8 image array, gathered, augmented and normalised as whole tensors.

    An iterable with a length, which Lightning accepts wherever it accepts a ``DataLoader``: it
    calls ``sampler.set_epoch`` every epoch and sizes schedules from ``len(loader)``. Batches come
    out as ``(images, labels)``: float32 (B, 3, H, W) normalised, int64 (B,), on ``device``.

    Args:
        images: uint8 (N, H, W, 3), the whole array of a split file; on ``device`` or on the CPU
            (then each uint8 batch is copied to ``device`` before it is augmented).
        labels: int64 (N,), on the same device as ``images``.
        indices: int64 positions in ``images`` that make up this split (train or validation).
        batch_size: images per batch (per process).
        train: shuffle, shard with padding and augment; else keep the order and do not augment.
        augment: a preset of ``AUGMENT_PRESETS``. flip_mode: ``random`` flips each image with
            probability 1/2; ``alternating`` flips a fixed random half of the images in even
            epochs and the other half in odd ones (airbench's alternating flip, arXiv:2404.00498).
        randaugment_n, randaugment_m: RandAugment's operations per image and level.
        cutout: side of the square zeroed in each training image after normalisation; 0 = off.
        random_erasing: probability of random erasing of each training image, after cutout.
        mean, std: per-channel normalisation, 0-1 scale.
        device: where batches are made. num_replicas, rank: the process's place under DDP.
        channels_last: make batches in channels-last memory format, the layout a network run
            with ``channels_last=True`` takes, so that it needs no copy of its own.
        seed: base seed, the same on every rank: the shuffle order comes from it, and augmentation
            from it mixed with the rank and the epoch, so ranks augment differently and a resumed
            run repeats the epochs it resumes.

    Resumable mid-epoch (Lightning's stateful-loader protocol): ``state_dict`` holds the epoch and
    the batches the training loop has taken from it (``batch_taken``, counted by the data module
    when a batch reaches the training step, so a batch prefetched but not trained on is not
    counted), and an iteration after ``load_state_dict`` continues from the next one. The random
    draws of the skipped batches are replayed on blank images (every draw depends on the batch's
    size alone), so the rest of the epoch gets the same crops, flips and policies as a run that
    was never stopped, on every rank.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        augment: AugmentPreset = "none",
        flip_mode: FlipMode = "random",
        randaugment_n: int = 2,
        randaugment_m: int = 9,
        rotate: float = 0.0,
        cutout: int = 0,
        random_erasing: float = 0.0,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        device: torch.device | str = "cpu",
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.indices = torch.as_tensor(indices, dtype=torch.long).to(images.device)
        self.batch_size = batch_size
        self.train = train
        self.augment, self.flip_mode, self.cutout, self.random_erasing = augment, flip_mode, cutout, random_erasing
        self.rotate = rotate
        h, w = images.shape[1:3]
        self.policy = (
            BatchPolicy(augment, randaugment_n, randaugment_m, h, w) if train and augment in POLICIES else None
        )
        self.device = torch.device(device)
        self.rank, self.seed = rank, seed
        self.sampler = EpochShards(len(self.indices), num_replicas, rank, shuffle=train, pad=train, seed=seed)
        self.batch_sampler = None  # batches are cut here; Lightning reads both attributes
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.flip_parity = None
        if train and flip_mode == "alternating":
            # One fixed bit per image, the same on every rank: an image flips when its bit
            # differs from the epoch's parity, so it is seen both ways in any two epochs.
            g = torch.Generator().manual_seed(_mix_seed(seed, 2))
            self.flip_parity = torch.randint(0, 2, (len(images),), generator=g).bool().to(images.device)
        #: (epoch, batches taken) of the epoch being iterated; None before the first batch.
        self._position: tuple[int, int] | None = None
        self._resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def batch_taken(self) -> None:
        """Count one more batch of the current epoch as taken by the training loop."""
        if self._position is not None:
            self._position = (self._position[0], self._position[1] + 1)

    def state_dict(self) -> dict[str, int]:
        """Where the training loop is in the loader's epochs (saved in a checkpoint by Lightning)."""
        if self._position is None:
            return {}
        return {"epoch": self._position[0], "batches": self._position[1], "seed": self.seed, "size": len(self.indices)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the next iteration of that epoch after the batches already taken."""
        if state and (state.get("seed"), state.get("size")) == (self.seed, len(self.indices)):
            self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self):
        # A generator: nothing runs until the first batch is asked for, so a set_epoch() call
        # made after iter() (as Lightning does) still counts.
        epoch = self.sampler.epoch
        self.sampler.set_epoch(epoch + 1)  # a plain loop without set_epoch() still reshuffles
        order = self.indices[self.sampler.positions(epoch).to(self.indices.device)]
        # On the CPU whatever the device: the same seed gives the same batches on a CPU and a GPU.
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.rank, epoch, 1))
        skip = self._resume_at[1] if self._resume_at is not None and self._resume_at[0] == epoch else 0
        self._resume_at = None
        self._position = (epoch, skip)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if start < skip * self.batch_size:
                with _single_threaded(self.device.type == "cpu"):
                    h, w = self.images.shape[1:3]
                    blank = torch.zeros(len(idx), 3, h, w, dtype=torch.uint8, device=self.device)
                    self.make_batch(blank, idx, epoch, generator)  # the draws, not the images
                continue
            # On a CPU a batch is a handful of small, memory-bound operations: a second OpenMP
            # thread gains little, and when the cores are shared with other processes each
            # operation waits for the slower thread (3-4x slower than one thread, measured on a
            # loaded 2-core machine). The model's convolutions keep every thread.
            with _single_threaded(self.device.type == "cpu"):
                x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)  # (B, H, W, 3)
                if x.device.type == "cpu" and self.device.type == "cuda":
                    # The array stayed on the host: a copy from pinned memory can overlap the
                    # GPU's work, one from pageable memory cannot (non_blocking is then ignored).
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                x = self.make_batch(x.permute(0, 3, 1, 2), idx, epoch, generator)
            yield x, y

    def make_batch(
        self, images: torch.Tensor, idx: torch.Tensor, epoch: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """uint8 (B, 3, H, W) of array positions ``idx`` to the normalised float batch."""
        if self.policy is not None:
            images = self.policy(images, generator)
        if self.train:
            pad, pad_mode, flip = AUGMENT_PRESETS[self.augment]
            flips = None
            if flip and self.flip_parity is not None:
                flips = self.flip_parity[idx].to(self.device) ^ bool(epoch % 2)
            elif flip:
                flips = on_device(torch.rand(len(images), generator=generator) < 0.5, self.device)
            images = random_crop_flip(images, pad, pad_mode, flips, generator)
            if self.rotate > 0:  # each image its own angle, as torchvision's RandomRotation draws it
                angles = (torch.rand(len(images), generator=generator, dtype=torch.float64) * 2 - 1) * self.rotate
                images = OPERATIONS["Rotate"](images, angles)  # the angles on the CPU, as drawn
        x = to_input(images, self.mean, self.std, self.memory_format)
        if self.train and self.cutout > 0:
            cutout_(x, self.cutout, generator)
        if self.train and self.random_erasing > 0:
            random_erasing_(x, self.random_erasing, generator)
        return x
