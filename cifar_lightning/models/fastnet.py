"""``fastnet``: a small, wide, shallow network built to reach ~94% on CIFAR-10 in a few epochs,
after the design of airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv:2404.00498, https://github.com/KellerJordan/cifar10-airbench).

Layout: a frozen 2x2-patch whitening conv (3 -> 24 channels), GELU, three conv groups of widths
64/256/256 (conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU), a global max pool and
a bias-free linear layer whose logits are scaled down by a constant.

Why each choice (from the airbench paper):
- Whitening: the first layer is fixed to decorrelate the 2x2x3 pixel patches of the training
  images (PCA whitening), so the network starts from features with identity covariance instead
  of learning them. Both signs of every eigenvector are kept so that the GELU after it loses
  nothing. ``init_from_data`` computes it; the trainer calls it once before training.
- BatchNorm with a fixed unit scale and a high momentum (0.6, i.e. the running statistics follow
  the last few batches) suits very short runs.
- Identity ("dirac") initialisation of the first ``in_channels`` filters of every conv makes each
  group start close to a pass-through.
- Max-pool right after the first conv of a group quarters the cost of everything after it.
- The 1/9 logit scale plays the role of a higher softmax temperature at initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_lightning.models.registry import register_model


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(
        self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float, learn_bn_scale: bool
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(learn_bn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.pool(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """airbench94-style network with a data-initialised, frozen whitening layer.

    Args:
        widths: output channels of each conv group; each group halves the map.
        whiten_kernel_size: side of the whitened pixel patches; the whitening layer has
            ``2 * 3 * k * k`` channels (each eigenvector with both signs).
        whiten_eps: added to the patch-covariance eigenvalues before the inverse square root,
            so that near-constant directions are not amplified without bound.
        whiten_bias: give the whitening conv a (trainable) bias; ``init_from_data`` sets it so
            the whitened training patches have zero mean.
        bn_momentum: PyTorch BatchNorm momentum, the weight of the newest batch in the running
            statistics.
        bn_eps: BatchNorm epsilon.
        learn_bn_scale: train the BatchNorm scale (airbench keeps it fixed at 1).
        logit_scale: constant multiplying the logits.
        dirac_init: initialise the first ``in_channels`` filters of each conv to the identity.
        num_classes: number of output logits.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 256, 256),
        whiten_kernel_size: int = 2,
        whiten_eps: float = 5e-4,
        whiten_bias: bool = True,
        bn_momentum: float = 0.6,
        bn_eps: float = 1e-12,
        learn_bn_scale: bool = False,
        logit_scale: float = 1 / 9,
        dirac_init: bool = True,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.whiten_eps = whiten_eps
        self.logit_scale = logit_scale
        whiten_width = 2 * 3 * whiten_kernel_size**2
        # No padding: a 32x32 image gives a 31x31 map for k = 2.
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel_size, bias=whiten_bias)
        self.whiten.weight.requires_grad_(False)
        # Saved in the state dict, so a loaded or already initialised model is not re-whitened.
        self.register_buffer("whiten_initialized", torch.tensor(False))
        groups, channels = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(channels, width, bn_momentum, bn_eps, learn_bn_scale))
            channels = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(channels, num_classes, bias=False)
        if dirac_init:
            for group in self.groups:
                for conv in (group.conv1, group.conv2):
                    with torch.no_grad():
                        nn.init.dirac_(conv.weight[: conv.in_channels])

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening layer from the patch covariance of normalised ``images`` (N, 3, H, W).

        Only the first call on a model does anything: later calls, and calls on a model whose
        state dict came from an initialised one, return at once.
        """
        if bool(self.whiten_initialized):
            return
        weight = self.whiten.weight  # (2D, 3, k, k) with D = 3 * k * k
        k = weight.shape[-1]
        # Accumulate first and second moments of the k x k patches in float64, in chunks so that
        # tens of thousands of images fit in memory.
        count, total, outer = 0, 0.0, 0.0
        for chunk in images.split(512):
            patches = F.unfold(chunk.to(weight.device, torch.float64), k)  # (B, D, L)
            patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B * L, D)
            count += patches.shape[0]
            total = total + patches.sum(0)
            outer = outer + patches.T @ patches
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)  # (D, D)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        # Row i projects a patch on eigenvector i and divides by its standard deviation.
        filters = eigenvectors.T / (eigenvalues.clamp_min(0) + self.whiten_eps).sqrt()[:, None]
        filters = torch.cat([filters, -filters])  # (2D, D)
        weight.copy_(filters.reshape(weight.shape))
        if self.whiten.bias is not None:
            self.whiten.bias.copy_(-(filters @ mean))
        self.whiten_initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))  # (B, 24, 31, 31)
        x = self.groups(x)  # (B, 256, 3, 3)
        x = torch.flatten(self.pool(x), 1)  # global max pool: (B, 256)
        return self.head(x) * self.logit_scale


@register_model(
    family="fastnet",
    source="Jordan 2024 (arXiv:2404.00498), airbench94-style net (KellerJordan/cifar10-airbench)",
)
def fastnet(*, num_classes: int = 10, **kwargs) -> FastNet:
    """airbench94-style fast-training network: 1,972,792 parameters for 10 classes.

    Call ``model.init_from_data(train_images)`` once before training to set the whitening layer.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`FastNet` (``widths``, ``bn_momentum``, ``logit_scale``, ...).
    """
    return FastNet(num_classes=num_classes, **kwargs)
