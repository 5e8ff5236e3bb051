"""Facts about CIFAR-10 and the files it comes in, each in one place with where it comes from."""

from __future__ import annotations

#: CIFAR-10 label order (index = label), as in the dataset's ``batches.meta``. It is also the
#: alphabetical order, so image folders sorted by name get the same indices.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

#: Per-channel mean and standard deviation of the 50,000 original CIFAR-10 training images,
#: scaled to [0, 1], computed over all pixels of the training split (the std is the population
#: std over every pixel, not the often-copied (0.2023, 0.1994, 0.2010), which averages per-image
#: stds). The JPEG copy gives (0.4913, 0.4821, 0.4465) / (0.2452, 0.2428, 0.2606): close enough
#: that one set of constants serves both.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: Side of a CIFAR image in pixels; images of any other size are resized to it when read.
IMAGE_SIZE = 32
#: Files read as images in image folders and by prediction.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
#: Archives of an image-folder tree that ``--data-dir`` accepts.
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
