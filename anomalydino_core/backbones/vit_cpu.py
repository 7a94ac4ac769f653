"""A bf16 CPU forward pass for timm ViT blocks (the DINOv2 ones), about twice as fast as autocast.

Under CPU autocast, timm's blocks re-cast every weight on every call, and PyTorch's CPU flash
attention splits each head into small GEMM calls. On x86 CPUs with AVX512-BF16 the attention then
takes about 60% of the forward pass. This path computes the same function with the same
precisions where they matter:

- weights are cast to bf16 once (re-cast only when a parameter changes);
- the residual stream, LayerNorm and LayerScale stay in fp32 (as under autocast);
- attention runs image by image as three large bf16 calls (QK^T, softmax, PV) whose working set
  stays in cache, the softmax accumulating in fp32.

The attention logits are rounded to bf16 before the softmax, where the flash kernel keeps them in
fp32. Their error is bounded by 2^-9 |q.k|, no larger than the error that rounding q and k to
bf16 (which both paths do) already puts on them; the test suite checks the features of both
paths against fp32. Blocks of any other layout (SwiGLU, gated or normalised attention) are not
handled: ``supports`` says so, and the caller keeps the autocast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, LayerScale


def supports(vit: torch.nn.Module) -> bool:
    """True when every block is a plain pre-norm ViT block this module computes exactly."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return False
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        if not (
            type(block) is Block
            and type(attn) is Attention
            and isinstance(attn.q_norm, torch.nn.Identity)
            and isinstance(attn.k_norm, torch.nn.Identity)
            and isinstance(attn.norm, torch.nn.Identity)
            and getattr(attn, "gate", None) is None
            and attn.qkv.bias is not None
            and type(mlp) is Mlp
            and isinstance(mlp.norm, torch.nn.Identity)
            and type(mlp.act) is torch.nn.GELU
            and isinstance(block.norm1, LayerNorm | torch.nn.LayerNorm)
            and isinstance(block.norm2, LayerNorm | torch.nn.LayerNorm)
            and isinstance(block.ls1, LayerScale)
            and isinstance(block.ls2, LayerScale)
        ):
            return False
    return True


class _Bf16Block:
    """One block's parameters as used by the fast path (bf16 matrices, fp32 norms and scales)."""

    def __init__(self, block: Block) -> None:
        attn, mlp = block.attn, block.mlp
        self.heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.gelu_approximate = mlp.act.approximate
        # Fold the 1/sqrt(d) scale into the query rows (a power of two for d=64: exact in bf16).
        scale = torch.ones(
            attn.qkv.out_features, dtype=torch.float32, device=attn.qkv.weight.device
        )
        scale[: attn.attn_dim] = attn.scale
        with torch.no_grad():
            self.w_qkv = (attn.qkv.weight.float() * scale[:, None]).to(torch.bfloat16)
            self.b_qkv = (attn.qkv.bias.float() * scale).to(torch.bfloat16)
            self.w_proj = attn.proj.weight.to(torch.bfloat16)
            self.b_proj = attn.proj.bias.to(torch.bfloat16)
            self.w_fc1 = mlp.fc1.weight.to(torch.bfloat16)
            self.b_fc1 = mlp.fc1.bias.to(torch.bfloat16)
            self.w_fc2 = mlp.fc2.weight.to(torch.bfloat16)
            self.b_fc2 = mlp.fc2.bias.to(torch.bfloat16)
        self.norm1 = block.norm1
        self.norm2 = block.norm2
        self.gamma1 = block.ls1.gamma
        self.gamma2 = block.ls2.gamma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) fp32 residual stream, updated in place and returned."""
        batch, tokens, dim = x.shape
        h = self.norm1(x).to(torch.bfloat16)
        qkv = F.linear(h, self.w_qkv, self.b_qkv).view(batch, tokens, 3, self.heads, self.head_dim)
        out = torch.empty(batch, self.heads, tokens, self.head_dim, dtype=torch.bfloat16)
        logits = torch.empty(self.heads, tokens, tokens, dtype=torch.bfloat16)
        for b in range(batch):
            q = qkv[b, :, 0].transpose(0, 1)
            k_t = qkv[b, :, 1].permute(1, 2, 0)
            v = qkv[b, :, 2].transpose(0, 1)
            torch.matmul(q, k_t, out=logits)
            torch.softmax(logits, dim=-1, out=logits)
            torch.matmul(logits, v, out=out[b])
        attn = out.transpose(1, 2).reshape(batch, tokens, dim)
        x.addcmul_(F.linear(attn, self.w_proj, self.b_proj), self.gamma1)
        h = self.norm2(x).to(torch.bfloat16)
        h = F.gelu(F.linear(h, self.w_fc1, self.b_fc1), approximate=self.gelu_approximate)
        x.addcmul_(F.linear(h, self.w_fc2, self.b_fc2), self.gamma2)
        return x


class Bf16CpuBlocks:
    """Runs ``vit.blocks`` in bf16 on CPU; caches the bf16 weights until a parameter changes."""

    def __init__(self, vit: torch.nn.Module) -> None:
        if not supports(vit):
            raise ValueError("these ViT blocks are not supported by the bf16 CPU path")
        self.vit = vit
        self._key: tuple | None = None
        self._blocks: list[_Bf16Block] = []

    def _params_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.device) for p in self.vit.blocks.parameters())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens (any float dtype) -> (B, N, C) fp32 tokens after the last block."""
        return self.with_taps(x, ())[0]

    @torch.inference_mode()
    def with_taps(
        self, x: torch.Tensor, taps: tuple[int, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As ``__call__``, plus a copy of the (B, N, C) fp32 tokens after each block in ``taps``
        (0-based block indices), in the order given."""
        key = self._params_key()
        if key != self._key:
            self._blocks = [_Bf16Block(block) for block in self.vit.blocks]
            self._key = key
        tapped: dict[int, torch.Tensor] = {}
        with torch.autocast("cpu", enabled=False):
            x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            for i, block in enumerate(self._blocks):
                x = block(x)
                if i in taps:
                    tapped[i] = x.clone()  # the blocks update x in place
        return x, [tapped[i] for i in taps]
