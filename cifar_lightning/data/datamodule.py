"""``CIFAR10DataModule``: a source, a seeded train/validation split, and the loaders over it.

Every source ends up as one uint8 array per split, shape (N, 32, 32, 3), held once in memory
(about 180 MB for all 60,000 images). Workers forked by the DataLoader share those pages, and
images become float only one batch at a time.

Two loaders read those arrays (``CIFAR10DataModule(loader=...)``):

- ``tensor`` (the default; with the same augmentation it made many times the images a second of
  the per-image path on a 2-core CPU, the ``data`` section of ``benchmarks/cpu.json``; not yet
  measured on a GPU): a ``TensorLoader`` that crops, flips and normalises whole batches as
  tensors on the training device.
- ``torchvision``: a ``DataLoader`` over a ``Dataset`` whose items go through torchvision
  transforms one image at a time, in worker processes. Every ``DataLoader`` idiom works with it.

Validation and test loaders visit their images in one fixed shuffled order
(``evaluation_order``), so any prefix of them is a fair sample.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from cifar_lightning.constants import IMAGE_SIZE
from cifar_lightning.data import datasets
from cifar_lightning.data.datasets import DatasetName
from cifar_lightning.data.sources import DataSource, download_dataset, image_folder_stats, load_split, resolve_source
from cifar_lightning.data.splits import check_val_size, evaluation_order, split_indices, val_count
from cifar_lightning.data.tensor_loader import FlipMode, TensorLoader
from cifar_lightning.data.transforms import AugmentPreset, batch_mixing, build_transform, to_input
from cifar_lightning.errors import UserError

LoaderKind = Literal["torchvision", "tensor"]


class ArrayDataset(Dataset):
    """A view of a shared uint8 image array through an index list: no copy per split or worker."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None, transform: Callable):
        self.images = images
        self.labels = labels
        self.indices = np.arange(len(images)) if indices is None else indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.images[j]), int(self.labels[j])


# ---------------------------------------------------------------------------------------------
# The DataModule
# ---------------------------------------------------------------------------------------------


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10, CIFAR-100 or your own image folder, for Lightning.

    Args:
        data_dir: a folder in torchvision's CIFAR-10 or CIFAR-100 format, an image-folder tree
            (``train/<class>/*``, ``test/<class>/*``) or an archive of one.
        dataset: ``cifar10``, ``cifar100`` or ``folder`` (any image-folder tree; images of other
            sizes are resized as prediction resizes them). It sets the torchvision class to
            download and read, the class names, the normalisation and CIFAR-100's superclasses;
            an image folder must then hold exactly that dataset's class folders. None (the
            default) takes what ``data_dir`` holds (``sources.resolve_source``), CIFAR-10 when
            it holds nothing.
        download: download the dataset with torchvision when ``data_dir`` holds no data (in
            ``prepare_data``, once per node; building the module downloads nothing).
        cache_dir: where archives are extracted and decoded arrays cached when the data folder is
            read-only (default ``$CIFAR_LIGHTNING_CACHE`` or ``~/.cache/cifar_lightning``).
        val_size: training images held out for validation (model selection), never the test set:
            a count (5000) or a fraction of the training split strictly between 0 and 1 (0.1, the
            default: 5,000 of CIFAR-10's 50,000). 0 trains on the whole training split with no
            validation (a final run once the settings are chosen); the run then keeps its last
            epoch instead of its best.
        split_seed: seed of the train/validation split, independent of the training seed.
        batch_size: images per batch (per device under DDP).
        augment: training augmentation preset: ``none``, ``standard`` (zero-pad 4, random crop,
            flip), ``flip``, ``translate`` (reflect-pad 2, random crop, flip), or a policy then the
            standard crop and flip: ``autoaugment`` (CIFAR-10 policy), ``randaugment``,
            ``trivialaugment`` (see ``policies.py``).
        randaugment_n, randaugment_m: RandAugment's operations per image and magnitude level (0-30).
        normalize: subtract ``mean`` and divide by ``std``; off gives plain [0, 1] tensors.
        mean, std: per-channel normalisation constants. Default: the dataset's (CIFAR-10's and
            CIFAR-100's published training-set figures; for ``folder``, computed from its
            ``train/`` images on first use and cached with the decoded arrays).
        num_workers, pin_memory, persistent_workers: DataLoader settings (``torchvision`` loader).
        loader: ``tensor`` (default: whole batches augmented as tensors on the training device;
            batches are finished inside the loader, so ``num_workers`` and ``pin_memory`` do not
            apply) or ``torchvision`` (a DataLoader with per-image transforms in workers).
        flip_mode: ``random`` or ``alternating`` (``tensor`` loader only; see ``TensorLoader``).
        rotate: rotation of each training image by an angle drawn uniformly from [-rotate, rotate]
            degrees, after the crop and flip, nearest pixel, black corners (torchvision's
            ``RandomRotation``, as weiaicunzai/pytorch-cifar100 trains CIFAR-100), 0 = off.
        cutout: side in pixels of a square zeroed in each training image, 0 = off (DeVries &
            Taylor 2017). random_erasing: probability of random erasing of each training image
            (Zhong et al. 2020), 0 = off. Both after normalisation, on either loader, with zeros.
        mixup, cutmix: alpha of MixUp / CutMix of each training batch, 0 = off (both loaders;
            see ``transforms.batch_mixing``). The targets become probabilities; validation and
            test batches are never mixed.
        mixup_prob: with both, the probability that a batch gets MixUp rather than CutMix.
        image_size: side in pixels the images are read at (default CIFAR's 32): files of any
            size are resized to it as prediction resizes them, CIFAR's arrays likewise. It flows
            into the checkpoint, so prediction and export use it too. The network must take it
            (``ClassifierModule`` checks); crops pad by the preset's pixels at any size.
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: DatasetName | None = None,
        download: bool = True,
        cache_dir: str | None = None,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        batch_size: int = 128,
        augment: AugmentPreset = "standard",
        normalize: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        loader: LoaderKind = "tensor",
        flip_mode: FlipMode = "random",
        randaugment_n: int = 2,
        randaugment_m: int = 9,
        rotate: float = 0.0,
        cutout: int = 0,
        random_erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 0.5,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {batch_size}. Pass e.g. --batch-size 128.")
        check_val_size(val_size)
        if num_workers < 0:
            raise UserError(f"num_workers must be 0 or more, got {num_workers}.")
        datasets.check_dataset_name(dataset)
        if not 8 <= image_size <= 1024:
            raise UserError(f"image_size must be between 8 and 1024 pixels, got {image_size}. CIFAR's own is 32.")
        if (mean is None) != (std is None):
            raise UserError("give --data.mean and --data.std together, or neither (the dataset's own).")
        if std is not None and any(s <= 0 for s in std):
            raise UserError(f"std must be positive in every channel, got {tuple(std)}.")
        build_transform(augment, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # validates the preset name now, not mid-fit
        if loader not in ("torchvision", "tensor"):
            raise UserError(f"unknown loader {loader!r}. Valid names: torchvision, tensor")
        if flip_mode not in ("random", "alternating"):
            raise UserError(f"unknown flip_mode {flip_mode!r}. Valid names: random, alternating")
        if not 0.0 <= rotate <= 180.0:
            raise UserError(f"rotate is a largest angle in degrees, from 0 (off) to 180, got {rotate}. Try 15.")
        if cutout < 0:
            raise UserError(f"cutout must be 0 (off) or a size in pixels, got {cutout}.")
        if randaugment_n < 1 or not 0 <= randaugment_m <= 30:
            raise UserError(
                f"RandAugment takes at least 1 operation and a level from 0 to 30, got n={randaugment_n}, "
                f"m={randaugment_m}. Try --data.randaugment_n 2 --data.randaugment_m 9."
            )
        if not 0.0 <= random_erasing <= 1.0:
            raise UserError(f"random_erasing is a probability, between 0 and 1, got {random_erasing}.")
        if loader == "torchvision" and flip_mode != "random":
            raise UserError("flip_mode 'alternating' needs the tensor loader: pass --data.loader tensor.")
        batch_mixing(mixup, cutmix, 2, mixup_prob)  # validates the alphas now, not mid-fit
        self.save_hyperparameters()
        # Finds the data (extracting an archive once) but downloads nothing: that is prepare_data's
        # job, run once per node. Missing data without download fails here, at once.
        self.source: DataSource = resolve_source(data_dir, download, cache_dir, dataset)
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None
        self._device_arrays: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mix: Any = None
        self._train_loader: DataLoader | TensorLoader | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """MixUp / CutMix of training batches, on the training device, after either loader.

        Lightning calls this for the batch that goes into the training step (a prefetched batch
        is not there yet), so the training loader counts it here as taken: a checkpoint then
        holds the exact place in the epoch to resume from."""
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(self._train_loader, TensorLoader):
            self._train_loader.batch_taken()
        if trainer is None or not trainer.training or not (self.hparams.mixup or self.hparams.cutmix):
            return batch
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return batch  # not a training batch: the model summary's example input
        if self._mix is None:
            self._mix = batch_mixing(self.hparams.mixup, self.hparams.cutmix, self.num_classes, self.hparams.mixup_prob)
        images, targets = batch
        # torchvision draws λ, the box and the choice from the global CPU generator, which dropout
        # also uses on a CPU: the draws get a generator of their own, seeded from the run's seed,
        # the rank and the step, so they are the same on a CPU and a GPU and after a resume.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        step_seed = (
            hash((seed, trainer.global_rank, trainer.global_step, trainer.fit_loop.epoch_loop.batch_idx)) % 2**63
        )
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(step_seed)
            return self._mix(images, targets)

    # Attributes linked into the model, so the checkpoint knows what the data looked like.
    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.source.class_names)

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the network sees (linked into the model)."""
        return self.hparams.image_size

    @property
    def dataset_name(self) -> str:
        """The dataset read: ``cifar10``, ``cifar100`` or ``folder`` (given, or found in ``data_dir``)."""
        return self.source.dataset

    @property
    def superclass_names(self) -> list[str] | None:
        """CIFAR-100's 20 superclasses; None for a dataset without them."""
        table = datasets.superclass_table(self.source.dataset, self.source.class_names)
        return table[0] if table else None

    @property
    def superclasses(self) -> list[int] | None:
        """The superclass of each class, in label order; None for a dataset without them."""
        table = datasets.superclass_table(self.source.dataset, self.source.class_names)
        return table[1] if table else None

    def channel_stats(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) the images are normalised with: given, the dataset's, or an image folder's own."""
        if self._stats is None:
            hp = self.hparams
            if hp.mean is not None:
                self._stats = tuple(hp.mean), tuple(hp.std)
            elif self.source.dataset in datasets.KNOWN:
                known = datasets.KNOWN[self.source.dataset]
                self._stats = known.mean, known.std
            else:  # decodes the training split once (it is cached for setup)
                self._stats = image_folder_stats(self.source.root, self.source.class_names, hp.cache_dir, hp.image_size)
        return self._stats

    @property
    def norm_mean(self) -> tuple[float, float, float]:
        return tuple(self.channel_stats()[0]) if self.hparams.normalize else (0.0, 0.0, 0.0)

    @property
    def norm_std(self) -> tuple[float, float, float]:
        return tuple(self.channel_stats()[1]) if self.hparams.normalize else (1.0, 1.0, 1.0)

    def prepare_data(self) -> None:
        """Download the dataset when asked and absent, and decode image folders into their cache.

        Lightning runs it on one process per node while the others wait, so a download or a
        decode happens once and the other ranks read the result in ``setup``.
        """
        self._find_downloaded()
        if self.source.needs_download:
            download_dataset(self.source)
            self._find_downloaded()
        if self.source.kind == "folder":
            for split in ("train", "test"):
                load_split(self.source, split, self.hparams.cache_dir, self.hparams.image_size)

    def _find_downloaded(self) -> None:
        if self.source.needs_download:
            self.source = resolve_source(self.hparams.data_dir, True, self.hparams.cache_dir, self.hparams.dataset)

    def setup(self, stage: str | None = None) -> None:
        self._find_downloaded()  # another process of this node may have downloaded it
        if self.source.needs_download:  # used without a Trainer, which would have called prepare_data
            self.prepare_data()
        eval_tf = build_transform("none", self.norm_mean, self.norm_std, size=self.hparams.image_size)
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = load_split(self.source, "train", self.hparams.cache_dir, self.hparams.image_size)
            self._check_superclasses("train", labels)
            n_val = val_count(self.hparams.val_size, len(images))
            if n_val >= len(images):
                raise UserError(
                    f"--data.val_size {self.hparams.val_size} holds out {n_val} images for validation, which "
                    f"leaves none of the {len(images)} training-split images for training. Pass a smaller "
                    "count or a fraction such as --data.val_size 0.1."
                )
            train_idx, val_idx = split_indices(len(images), n_val, self.hparams.split_seed)
            hp = self.hparams
            train_tf = build_transform(
                hp.augment,
                self.norm_mean,
                self.norm_std,
                hp.cutout,
                hp.random_erasing,
                hp.randaugment_n,
                hp.randaugment_m,
                hp.image_size,
                hp.rotate,
            )
            self.train_set = ArrayDataset(images, labels, train_idx, train_tf)
            self.val_set = ArrayDataset(images, labels, evaluation_order(val_idx), eval_tf) if len(val_idx) else None
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = load_split(self.source, "test", self.hparams.cache_dir, self.hparams.image_size)
            self._check_superclasses("test", labels)
            self.test_set = ArrayDataset(images, labels, evaluation_order(np.arange(len(images))), eval_tf)
            # trainer.predict returns its outputs in file order, so they line up with the files.
            self.predict_set = ArrayDataset(images, labels, None, eval_tf)

    def _check_superclasses(self, split: str, labels: np.ndarray) -> None:
        """CIFAR-100's files carry each image's superclass (``coarse_labels``): they must agree with
        the table the model is given (``constants.CIFAR100_SUPERCLASSES``)."""
        if self.source.kind != "torchvision" or self.source.dataset != "cifar100":
            return
        names, coarse = datasets.read_coarse_labels(self.source.root, split)
        if names != self.superclass_names or not np.array_equal(np.asarray(self.superclasses)[labels], coarse):
            raise UserError(
                f"the coarse labels of {self.source.root}/cifar-100-python/{split} do not match CIFAR-100's "
                "superclass table: the files are not CIFAR-100's. Download them again (--download)."
            )

    def split_arrays(self, split: Literal["val", "test"]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, 32, 32, 3), int64 labels (N,)) of the validation or test split, in file
        order (the loaders visit them in ``evaluation_order``)."""
        self.setup("fit" if split == "val" else "test")
        ds = self.val_set if split == "val" else self.test_set
        if ds is None:
            raise UserError("there is no validation split: --data.val_size is 0.")
        idx = np.sort(ds.indices)
        return ds.images[idx], np.asarray(ds.labels)[idx]

    def sample_train_indices(self, n: int) -> np.ndarray:
        """Positions in the training split's arrays of ``sample_train_images(n)``."""
        if self.train_set is None:
            self.setup("fit")
        ds = self.train_set
        return np.sort(evaluation_order(ds.indices)[: min(n, len(ds))])

    def sample_train_images(self, n: int) -> torch.Tensor:
        """``n`` training-split images, normalised, without augmentation: (n, 3, 32, 32).

        A fair sample of every class (the first ``n`` in ``evaluation_order``: an image folder
        lists its files class by class, so the first 5,000 would be airplanes alone), and the same
        on every DDP rank (used for data-dependent init).
        """
        idx = self.sample_train_indices(n)
        ds = self.train_set
        return to_input(torch.from_numpy(ds.images[idx]).permute(0, 3, 1, 2), self.norm_mean, self.norm_std)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader | TensorLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if self.hparams.loader == "tensor":
            return self.tensor_loader(dataset, train)
        sampler = None
        trainer = self.trainer
        if not train and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads the last batch with repeated samples,
            # which would count them twice in validation/test metrics. This sampler does not.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            drop_last=False,
        )

    def tensor_loader(
        self, dataset: ArrayDataset, train: bool, device: torch.device | None = None, seed: int | None = None
    ) -> TensorLoader:
        """A ``TensorLoader`` over ``dataset`` (``train_set``, ``val_set`` or ``test_set``).

        ``device`` defaults to the trainer's (the CPU without one). ``seed`` defaults to what the
        ranks agree on: Lightning's global seed (what it gives its own DistributedSampler), else 0
        under DDP, else this process's torch seed.
        """
        trainer = self.trainer
        if device is None:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        images, labels = self.arrays_on(dataset, device)
        if seed is None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            seed = int(seed) if seed is not None else (0 if world_size > 1 else torch.initial_seed())
        return TensorLoader(
            images,
            labels,
            torch.from_numpy(np.asarray(dataset.indices, dtype=np.int64)),
            self.hparams.batch_size,
            train=train,
            augment=self.hparams.augment if train else "none",
            flip_mode=self.hparams.flip_mode,
            randaugment_n=self.hparams.randaugment_n,
            randaugment_m=self.hparams.randaugment_m,
            rotate=self.hparams.rotate if train else 0.0,
            cutout=self.hparams.cutout if train else 0,
            random_erasing=self.hparams.random_erasing if train else 0.0,
            mean=self.norm_mean,
            std=self.norm_std,
            device=device,
            num_replicas=world_size,
            rank=rank,
            seed=seed,
            # Batches in the layout the network runs in: a channels-last model then copies nothing.
            channels_last=bool(getattr(getattr(trainer, "lightning_module", None), "hparams", {}).get("channels_last")),
        )

    def arrays_on(self, dataset: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A split file's whole image and label arrays as tensors, moved once to a GPU ``device``.

        On the CPU the tensors share the numpy arrays' memory. A GPU copy is made when the array
        takes at most a quarter of the free GPU memory (CIFAR-10's training file: 150 MB), and
        then shared by the training and validation loaders; otherwise batches are copied over
        one at a time.
        """
        key = (id(dataset.images), str(device))
        if key not in self._device_arrays:
            images = torch.from_numpy(dataset.images)
            labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
                if images.nbytes <= free // 4:
                    images, labels = images.to(device), labels.to(device)
                else:
                    rank_zero_warn(
                        f"the {len(images):,}-image array ({images.nbytes / 2**20:,.0f} MiB) takes more than a quarter "
                        f"of the free GPU memory ({free / 2**20:,.0f} MiB): it stays on the host, and each batch "
                        "is copied to the GPU through pinned memory, which is slower."
                    )
            self._device_arrays[key] = (images, labels)
        return self._device_arrays[key]

    def train_dataloader(self) -> DataLoader | TensorLoader:
        self._train_loader = self._loader(self.train_set, train=True)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | TensorLoader | list:
        if self.hparams.val_size == 0:
            # No validation asked for: Lightning skips the loop, and its note about an empty
            # loader list would only repeat that.
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader | TensorLoader:
        return self._loader(self.predict_set, train=False)
