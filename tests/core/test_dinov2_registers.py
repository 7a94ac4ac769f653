"""Official DINOv2 register checkpoints (``*_reg4_pretrain.pth``) load into our ``_reg`` backbones
and give the official register forward's patch features."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from anomalydino_core.backbones import build_backbone
from tasks.weights import load_backbone

vits = pytest.importorskip(
    "dinov2.models.vision_transformer", reason="authors' code: pip install --no-deps dinov2"
)

# size: (embed dim, depth, heads, ffn) as in the authors' vit_small / base / large / giant2
ARCHS = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglufused"),
}


class OfficialRegViT(vits.DinoVisionTransformer):
    """The authors' ViT as their hub builds the ``_reg`` models.

    The installed ``dinov2==0.0.1.dev2`` predates registers, so what upstream
    facebookresearch/dinov2 adds for them is transcribed here from its
    ``models/vision_transformer.py``: ``register_tokens`` inserted after the class token, after
    the positions are added (so they get none), and ``interpolate_pos_encoding`` with the
    ``interpolate_antialias=True, interpolate_offset=0.0`` that ``hub/backbones.py`` passes for
    every ``dinov2_vit*14_reg``. Blocks, patch embedding and norm are the installed code.
    """

    interpolate_antialias = True
    interpolate_offset = 0.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_tokens = torch.nn.Parameter(torch.zeros(1, 4, self.embed_dim))

    def interpolate_pos_encoding(self, x, w, h):  # upstream, verbatim but for style
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        M = int(math.sqrt(N))
        assert N == M * M
        kwargs = {}
        if self.interpolate_offset:
            sx = float(w0 + self.interpolate_offset) / M
            sy = float(h0 + self.interpolate_offset) / M
            kwargs["scale_factor"] = (sx, sy)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        x = super().prepare_tokens_with_masks(x, masks)  # class token, then + positions
        regs = self.register_tokens.expand(x.shape[0], -1, -1)
        return torch.cat((x[:, :1], regs, x[:, 1:]), dim=1)

    def patch_features(self, x):
        return self.forward_features(x)["x_norm_patchtokens"][:, 4:]  # registers come first


def official_reg(size: str, depth: int | None = None) -> OfficialRegViT:
    """The official ``dinov2_vit{size}14_reg``, every parameter randomised (on CPU)."""
    dim, full_depth, heads, ffn = ARCHS[size]
    model = OfficialRegViT(
        img_size=518,
        patch_size=14,
        embed_dim=dim,
        depth=depth or full_depth,
        num_heads=heads,
        mlp_ratio=4,
        init_values=1.0,
        ffn_layer=ffn,
        block_chunks=0,
        drop_path_uniform=True,  # no Tensor.item(): builds on the meta device too
        block_fn=partial(vits.Block, attn_class=vits.MemEffAttention),
    ).eval()
    if model.pos_embed.is_meta:
        return model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.2, 1.0)  # LayerScale far from 1e-5 so every block matters
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name in ("pos_embed", "cls_token", "register_tokens"):
                p.normal_(0.0, 1.0)  # strong tokens: a lost class position or register shows
            else:
                p.normal_(0.0, 0.05)
    return model


def ours_reg(size: str, depth: int | None = None) -> torch.nn.Module:
    """Our registered ``dinov2_vit{size}14_reg`` encoder (cut to ``depth`` blocks), no weights."""
    with torch.device("meta"):  # built without initialising (or allocating) the full model
        module = build_backbone(f"dinov2_vit{size}14_reg").module
    module.vit.blocks = module.vit.blocks[:depth]
    return module.to_empty(device="cpu")


@pytest.mark.parametrize("size", list(ARCHS))
def test_official_reg_layout_loads_into_every_reg_backbone(size):
    """Full-size official layout (1370 positions, register_tokens, mask_token): every key and
    shape of every ``_reg`` backbone, with and without ``mask_token`` (timm alone needs it)."""
    with torch.device("meta"):
        state = official_reg(size).state_dict()
        ours = build_backbone(f"dinov2_vit{size}14_reg").module
    assert state["pos_embed"].shape[1] == 1 + 37 * 37 and state["register_tokens"].shape[1] == 4
    ours.load_official_state_dict(state)  # strict
    ours.load_official_state_dict({k: v for k, v in state.items() if k != "mask_token"})
    assert ours.vit.pos_embed.shape[1] == 37 * 37 and ours.vit.num_prefix_tokens == 5


def _compare(official, ours, size: tuple[int, int]) -> tuple[float, float]:
    """(max |difference| of the tokens entering the first block, min per-patch cosine of the
    final patch features). The tokens are where the conversion acts: class token, registers and
    positions; the class token itself barely moves the patch features."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        tokens = ours.vit._pos_embed(ours.vit.patch_embed(x))
        token_err = (tokens - official.prepare_tokens_with_masks(x)).abs().max().item()
        ref = official.patch_features(x)
        got = ours(x)
    assert got.shape == (1, size[0] // 14, size[1] // 14, ref.shape[-1])
    return token_err, F.cosine_similarity(got.reshape(ref.shape), ref, dim=-1).min().item()


def _load(official, ours) -> None:
    ours.load_official_state_dict({k: v.clone() for k, v in official.state_dict().items()})


SIZES = [(448, 448), (672, 672), (448, 616)]


@pytest.mark.parametrize(
    ("size", "depth", "from_file"),
    [("s", None, True), ("b", None, False), ("l", 1, False), ("g", 1, False)],
    ids=["vits14_reg", "vitb14_reg", "vitl14_reg-1block", "vitg14_reg-1block"],
)
def test_reg_features_match_official_register_forward(size, depth, from_file, tmp_path):
    """ViT-S (loaded from a checkpoint file, as users load ``*_reg4_pretrain.pth``) and ViT-B at
    full depth; ViT-L and ViT-g (SwiGLU) cut to one block, at the non-square size only."""
    official = official_reg(size, depth)
    if from_file:
        path = tmp_path / f"my_vit{size}14_reg4.pth"
        torch.save(official.state_dict(), path)
        ours = load_backbone(f"dinov2_vit{size}14_reg", weights=str(path)).module
    else:
        ours = ours_reg(size, depth)
        _load(official, ours)
    for hw in SIZES if depth is None else SIZES[-1:]:
        token_err, cos = _compare(official, ours, hw)
        assert token_err < 1e-4 and cos >= 0.9999, (size, hw, token_err, cos)


def test_parity_detects_a_lost_class_position_or_plain_interpolation():
    """Dropping pos_embed[:, 0] instead of moving it into the class token, or resampling the
    positions like the plain models (offset 0.1, no antialias), is caught."""
    official, ours = official_reg("s", depth=2), ours_reg("s", depth=2)
    _load(official, ours)
    with torch.no_grad():
        ours.vit.cls_token -= official.pos_embed[:, :1]
    assert _compare(official, ours, (448, 448))[0] > 0.1
    _load(official, ours)
    ours.interpolate_offset, ours.antialias = 0.1, False
    token_err, cos = _compare(official, ours, (448, 616))
    assert token_err > 0.1 and cos < 0.9999, (token_err, cos)
