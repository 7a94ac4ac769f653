"""The manifold projector: a small ViT that maps frozen encoder tokens back onto normal data.

FoundAD (Zhai et al., ICLR 2026) trains this module on a few normal images; at test time the
anomaly map is the per-patch squared difference between the encoder tokens and their projection.

Architecture (the authors' ``VisionTransformerPredictor``, also ported by anomalib 2.7.0):

    x0 = embed(tokens)                      Linear(D -> 384)
    x  = x0
    for block in blocks:                    6 pre-norm ViT blocks (384 wide, 12 heads, MLP 4x,
        x = block(x) + x0                   GELU, qkv bias, LayerNorm eps 1e-6), global skip
    out = head(norm(x))                     LayerNorm(384), Linear(384 -> D)

No positional encoding (the authors' default), so any number of tokens works. 11.23M parameters
for D = 768 (ViT-B/14 tokens), 10.75M for D = 384, 10.14M for D = 112 (EfficientNet-Lite0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

#: Standard deviation of the truncated-normal initialisation of every linear weight.
INIT_STD = 0.02


@dataclass(frozen=True)
class ProjectorConfig:
    """Shape of the projector (the paper's defaults).

    ``embed_dim`` (D) is the encoder's token width and must be given; the rest is internal.
    """

    embed_dim: int
    width: int = 384
    depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "width": self.width,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "norm_eps": self.norm_eps,
        }


class ManifoldProjector(nn.Module):
    """``forward(tokens)``: (B, N, D) or (B, h, w, D) float -> the same shape, projected.

    Built in fp32 and initialised as the authors do (truncated normal std 0.02 for linear
    weights, zero biases, unit LayerNorms, then every block's attention-output and second MLP
    weights divided by sqrt(2 * (i + 1)) for block i), so the global residual stream starts small.
    """

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        norm = partial(nn.LayerNorm, eps=config.norm_eps)
        self.embed = nn.Linear(config.embed_dim, config.width)
        self.blocks = nn.ModuleList(
            Block(
                dim=config.width,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=True,
                norm_layer=norm,
                act_layer=nn.GELU,
            )
            for _ in range(config.depth)
        )
        self.norm = norm(config.width)
        self.head = nn.Linear(config.width, config.embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for i, block in enumerate(self.blocks):
            scale = math.sqrt(2.0 * (i + 1))
            block.attn.proj.weight.div_(scale)
            block.mlp.fc2.weight.div_(scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        shape = tokens.shape
        if shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"tokens of width {shape[-1]}, projector expects {self.config.embed_dim}"
            )
        x0 = self.embed(tokens.reshape(shape[0], -1, shape[-1]))
        x = x0
        for block in self.blocks:
            x = block(x) + x0
        return self.head(self.norm(x)).reshape(shape)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# anomalib 2.7.0 / the authors' predictor name the same tensors with a "predictor_" prefix; the
# blocks' inner names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) are the same as timm's.
_ANOMALIB_KEYS = (
    (re.compile(r"^predictor_embed\."), "embed."),
    (re.compile(r"^predictor_blocks\."), "blocks."),
    (re.compile(r"^predictor_norm\."), "norm."),
    (re.compile(r"^predictor_proj\."), "head."),
)


def from_anomalib_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """anomalib's ``ManifoldProjector`` (or the authors' predictor) state dict in our names.

    ``predictor_embed`` -> ``embed``, ``predictor_blocks.i`` -> ``blocks.i``, ``predictor_norm``
    -> ``norm``, ``predictor_proj`` -> ``head``. A positional embedding (``predictor_pos_embed``,
    off by default there) has no counterpart here and is rejected.
    """
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _ANOMALIB_KEYS:
            new = pattern.sub(repl, new)
        if new == key:
            raise KeyError(f"no counterpart for projector tensor {key!r}")
        out[new] = value
    return out
