"""A small Vision Transformer for 32x32 images (Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words", arXiv:2010.11929).

4x4 patches give 64 tokens plus a class token. Pre-norm blocks (LayerNorm -> attention,
LayerNorm -> MLP, each residual), a learnable position embedding and a linear head on the class
token (or on the mean token). Attention uses ``F.scaled_dot_product_attention``, which picks a
fused kernel where one exists and traces cleanly under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_lightning.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer for small images.

    Args:
        image_size: input height and width.
        patch_size: side of the square patches (tokens = (image_size / patch_size)^2).
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden width over ``dim``.
        dropout: dropout in attention and MLP.
        pool: ``"cls"`` (class token) or ``"mean"`` (mean of the patch tokens) for the head.
        num_classes: number of output logits.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        pool: str = "cls",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        # The class token exists only when it is used, so every parameter gets a gradient.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + (pool == "cls"), dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Truncated normal (std 0.02) for embeddings and linear layers, as in the ViT reference code.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, dim)
        x = self.norm(self.blocks(x + self.pos_embed))
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)


@register_model(
    family="vit",
    source="Dosovitskiy et al. 2021 (arXiv:2010.11929); 4x4 patches, dim 256, depth 6, 8 heads for 32x32",
)
def vit(*, num_classes: int = 10, **kwargs) -> ViT:
    """Small ViT for CIFAR (arXiv:2010.11929): 3,195,146 parameters for 10 classes.

    Args:
        num_classes: number of output logits.
        **kwargs: forwarded to :class:`ViT` (``dim``, ``depth``, ``heads``, ``pool``, ...).
    """
    return ViT(num_classes=num_classes, **kwargs)
