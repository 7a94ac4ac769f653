"""DINOv2 ViTs built by timm, with the official position-embedding interpolation."""

from __future__ import annotations

import math
import re
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from . import vit_cpu
from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, WeightsSpec, register_backbone

_OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"


class DinoV2PatchEncoder(torch.nn.Module):
    """Last-block patch tokens with the final LayerNorm; CLS and register tokens dropped.

    ``forward(x)`` takes (B, 3, H, W) with H, W multiples of 14 and returns (B, H/14, W/14, C).
    The position embedding (trained at 37 x 37) is resampled exactly as the official hub model
    does: bicubic, ``scale_factor=(g + offset) / 37`` for offset 0.1, or ``size=g`` with
    antialiasing for the register variants (offset 0).

    On CPU under bf16 autocast the blocks run through :mod:`.vit_cpu` while ``cpu_bf16_blocks``
    is True (the ``vit_cpu`` runtime; about twice as fast as timm's blocks on AMD with
    AVX512-BF16, on par on an Intel AMX Xeon); False keeps timm's own blocks there too (the
    ``torch`` runtime). The runtime chosen for a model sets it (``tasks/runtimes.py``), so
    ``forward_with_foundad`` runs the same blocks as ``forward``.
    """

    patch_size = 14

    def __init__(
        self,
        vit: VisionTransformer,
        *,
        interpolate_offset: float,
        antialias: bool,
        cpu_bf16_blocks: bool = True,
    ):
        super().__init__()
        self.vit = vit
        self.interpolate_offset = interpolate_offset
        self.antialias = antialias
        self.vit._pos_embed = self._pos_embed  # type: ignore[method-assign]
        supported = vit_cpu.supports(vit)
        self.cpu_bf16_blocks = cpu_bf16_blocks and supported
        self._bf16_blocks = vit_cpu.Bf16CpuBlocks(vit) if supported else None

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an official DINOv2 checkpoint, plain or with registers (or timm-format weights)."""
        converted = checkpoint_filter_fn(official_to_timm(state_dict), self.vit)
        self.vit.load_state_dict(converted, strict=True)

    def _resampled_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        vit = self.vit
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = vit.pos_embed.float()
        n_patch = pos.shape[1] - prefix
        side = int(math.sqrt(n_patch))
        if grid_h == side and grid_w == side:
            return pos
        patch_pos = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = (
                (grid_h + self.interpolate_offset) / side,
                (grid_w + self.interpolate_offset) / side,
            )
            patch_pos = F.interpolate(
                patch_pos, scale_factor=scale, mode="bicubic", antialias=self.antialias
            )
        else:
            patch_pos = F.interpolate(
                patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=self.antialias
            )
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position embedding resampled to {tuple(patch_pos.shape[-2:])}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :prefix], patch_pos], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = x.shape[1:3]
        return self._with_prefix_tokens(x, self._resampled_pos_embed(grid_h, grid_w))

    def _with_prefix_tokens(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw, C) patch embeddings -> (B, prefix + N, C) tokens with positions ``pos``."""
        vit = self.vit
        batch, grid_h, grid_w, dim = x.shape
        x = x.reshape(batch, grid_h * grid_w, dim)
        pos = pos.to(x.dtype)
        cls = vit.cls_token.expand(batch, -1, -1)
        if vit.no_embed_class:
            x = torch.cat([cls, x + pos], dim=1)
        else:
            x = torch.cat([cls, x], dim=1) + pos
        if vit.reg_token is not None:
            x = torch.cat([x[:, :1], vit.reg_token.expand(batch, -1, -1), x[:, 1:]], dim=1)
        return vit.pos_drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        if self._use_bf16_blocks(x):
            vit = self.vit
            tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
            tokens = vit.norm(self._bf16_blocks(tokens))
        else:
            tokens = self.vit.forward_features(x)
        return self._patch_grid(tokens, x)

    def _use_bf16_blocks(self, x: torch.Tensor) -> bool:
        return self.cpu_bf16_blocks and self._bf16_blocks is not None and _cpu_bf16_autocast(x)

    def fixed_shape_module(
        self, height: int, width: int, *, token_multiple: int = 1
    ) -> torch.nn.Module:
        """This encoder for (B, 3, ``height``, ``width``) inputs only, for export: the position
        embedding resampled once here (a constant of the graph), timm's blocks in fp32, the
        token sequence padded to a multiple of ``token_multiple`` (see ``_FixedGridEncoder``);
        its output equals ``forward`` bit for bit in fp32 unpadded, to fp32 rounding padded."""
        self._check_size(torch.empty(0, 3, height, width))
        grid = (height // self.patch_size, width // self.patch_size)
        return _FixedGridEncoder(self, *grid, token_multiple=token_multiple)

    #: FoundAD reads the tokens after the third-to-last block (``n_layer=3`` of the paper).
    foundad_blocks_from_end = 3

    @property
    def foundad_dim(self) -> int:
        return int(self.vit.embed_dim)

    def forward_with_foundad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass, two outputs: ``(forward(x), foundad)``, both (B, H/14, W/14, C).

        ``foundad``: patch tokens after block ``depth - 3`` with the final LayerNorm applied (what
        the FoundAD authors take, ``get_intermediate_layers(n=3)[0]`` with ``norm=True``), not
        L2-normalised. The first output is bit-identical to ``forward(x)``.
        """
        self._check_size(x)
        vit = self.vit
        tap = len(vit.blocks) - self.foundad_blocks_from_end
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        if self._use_bf16_blocks(x):
            tokens, (middle,) = self._bf16_blocks.with_taps(tokens, (tap,))
        else:
            for i, block in enumerate(vit.blocks):
                tokens = block(tokens)
                if i == tap:
                    middle = tokens
        return self._patch_grid(vit.norm(tokens), x), self._patch_grid(vit.norm(middle), x)

    def _check_size(self, x: torch.Tensor) -> None:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of {self.patch_size}")

    def _patch_grid(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, C) tokens -> (B, H/14, W/14, C) patch tokens of input ``x``."""
        batch, _, height, width = x.shape
        patches = tokens[:, self.vit.num_prefix_tokens :]
        return patches.reshape(batch, height // self.patch_size, width // self.patch_size, -1)


class _FixedGridEncoder(torch.nn.Module):
    """``DinoV2PatchEncoder.forward`` for one patch grid, position embedding precomputed.

    ``token_multiple`` > 1: the blocks run on the tokens padded with zeros to a multiple of it,
    the padding masked out of every attention (an additive -inf on its keys), so the real
    tokens see only each other: the same features to fp32 rounding (the sums of the attention
    run in other blocks: ViT-S/14 with and without registers, within 6e-8 with timm's
    initialisation, 2e-6 of values up to ~10 with strong LayerScales). Attention kernels
    run whole vector blocks then: ViT-S/14 at 448 (1,025 tokens) compiled by OpenVINO 2026.4 in
    bf16, 2 threads (Intel Xeon, AMX), one image: 87.4 ms unpadded, 80.6 / 76.5 / 76.7 / 85.5
    padded to a multiple of 8 / 16 / 32 / 128 (1,032 / 1,040 / 1,056 / 1,152 tokens); its
    attention 45.0 ms unpadded, 34.6 at 32.
    """

    def __init__(
        self, encoder: DinoV2PatchEncoder, grid_h: int, grid_w: int, *, token_multiple: int = 1
    ) -> None:
        super().__init__()
        self.vit = encoder.vit
        self.grid = (grid_h, grid_w)
        self._with_prefix_tokens = encoder._with_prefix_tokens
        with torch.no_grad():
            pos = encoder._resampled_pos_embed(grid_h, grid_w).detach().clone()
        self.register_buffer("pos", pos, persistent=False)
        tokens = self.vit.num_prefix_tokens + grid_h * grid_w
        self.padding = -tokens % max(1, int(token_multiple))
        mask = torch.zeros(1, 1, 1, tokens + self.padding)
        mask[..., tokens:] = float("-inf")
        self.register_buffer("key_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit.norm_pre(self._with_prefix_tokens(vit.patch_embed(x), self.pos))
        real = tokens.shape[1]
        if self.padding:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, self.padding))
        mask = self.key_mask if self.padding else None
        for block in vit.blocks:
            tokens = block(tokens, attn_mask=mask)
        patches = vit.norm(tokens)[:, vit.num_prefix_tokens : real]
        return patches.reshape(x.shape[0], *self.grid, patches.shape[-1])


_SWIGLU_KEYS = (
    (re.compile(r"^(blocks\.\d+\.mlp\.)w12\."), r"\1fc1."),
    (re.compile(r"^(blocks\.\d+\.mlp\.)w3\."), r"\1fc2."),
)


def official_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in timm's layout; a timm-layout dict comes back unchanged.

    The official register models add the class position ``pos_embed[:, 0]`` to the class token,
    then insert the registers after it with no position. timm's register variants keep positions
    for the patches only (``no_embed_class``), so the class position moves into the class token:
    ``cls_token + pos_embed[:, :1]`` and ``pos_embed[:, 1:]`` feed the first block the same
    tokens. timm's own filter does this only while ``mask_token`` is still in the dict.
    """
    state = dict(state_dict)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        pos = state.pop("pos_embed")
        n_patch = pos.shape[1] - 1
        if math.isqrt(n_patch) ** 2 != n_patch:
            raise ValueError(f"register checkpoint pos_embed {tuple(pos.shape)}: no class position")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
        state["reg_token"] = state.pop("register_tokens")
    for pattern, repl in _SWIGLU_KEYS:  # ViT-g: SwiGLU w12/w3 are timm's packed fc1/fc2
        state = {pattern.sub(repl, k): v for k, v in state.items()}
    return state


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def _build(timm_name: str, *, reg: bool) -> DinoV2PatchEncoder:
    vit = timm.create_model(
        timm_name, pretrained=False, img_size=518, dynamic_img_size=True, num_classes=0
    )
    return DinoV2PatchEncoder(vit, interpolate_offset=0.0 if reg else 0.1, antialias=reg)


_ARCHS = {
    # name: (timm arch, embed dim, official sha256 of the plain / reg checkpoint)
    "s": (
        "vit_small_patch14",
        384,
        "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
        None,
    ),
    "b": (
        "vit_base_patch14",
        768,
        "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73",
        "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71",
    ),
    "l": ("vit_large_patch14", 1024, None, None),
    "g": ("vit_giant_patch14", 1536, None, None),
}

#: Images per forward pass on CPU. ViT-S/14 at 448 with OpenVINO bf16, 2 threads: images per
#: request 1 / 2 / 4 / 8 took 202 / 200 / 208 / 211 ms each on the AMD EPYC and 73.5 / 68.2 /
#: 66.7 / 65.9 on the Intel Xeon (AMX); the calibration beside the preprocessing on that Xeon:
#: batch 2 98.1 ms/img, batch 8 108.1. The peer bench's 1-shot audit (3 interleaved rounds):
#: batch 8 / 4 / 2 / 1 113.6 / 113.7 / 115.1 / 117.3 ms/img at peak 1.51 / 1.44 / 1.41 / 1.37
#: GiB: the activations of a batch are the pipeline's largest buffers.
DINOV2_CPU_BATCH = 2

for _size, (_timm_arch, _dim, _sha, _sha_reg) in _ARCHS.items():
    for _reg in (False, True):
        _arch = f"dinov2_vit{_size}14"
        _name = _arch + ("_reg" if _reg else "")
        _timm_name = f"{_timm_arch}_{'reg4_' if _reg else ''}dinov2"
        _file = f"{_arch}{'_reg4' if _reg else ''}_pretrain.pth"
        register_backbone(
            BackboneSpec(
                name=_name,
                family="dinov2",
                build=partial(_build, _timm_name, reg=_reg),
                feature_dim=_dim,
                patch_size=14,
                size_multiple=14,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                weights=WeightsSpec(
                    filename=_file,
                    sha256=_sha_reg if _reg else _sha,
                    url=_OFFICIAL_URL.format(arch=_arch, reg="_reg4" if _reg else ""),
                    hf_hub_id=f"timm/{_timm_name}.lvd142m",
                ),
                mask_threshold=10.0,
                cpu_batch_size=DINOV2_CPU_BATCH,
            )
        )
