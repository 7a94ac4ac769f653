"""The torch runtimes: the backbone module in eager mode (``torch``), and for DINOv2 under bf16 on
CPU its hand-written block loop (``vit_cpu``, :mod:`anomalydino_core.backbones.vit_cpu`)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def _cpu_bf16_blocks(module: torch.nn.Module, enabled: bool | None):
    """Set a DINOv2 encoder's ``cpu_bf16_blocks`` for one call (``None``: leave it)."""
    if enabled is None or not hasattr(module, "cpu_bf16_blocks"):
        yield
        return
    saved = module.cpu_bf16_blocks
    module.cpu_bf16_blocks = enabled
    try:
        yield
    finally:
        module.cpu_bf16_blocks = saved


def has_vit_cpu_blocks(module: torch.nn.Module) -> bool:
    """The module can run its blocks through ``vit_cpu`` (a plain DINOv2 ViT)."""
    return getattr(module, "_bf16_blocks", None) is not None


class TorchRunner:
    """(B, 3, H, W) float32 -> (B, gh, gw, C) float32 numpy with the torch module.

    ``vit_cpu_blocks``: True runs DINOv2's blocks through ``vit_cpu`` under bf16 on CPU, False
    through timm's blocks under autocast, None keeps the module's own setting.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        device: torch.device,
        precision: str,
        channels_last: bool,
        vit_cpu_blocks: bool | None = None,
    ) -> None:
        self.module = module
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.vit_cpu_blocks = vit_cpu_blocks

    @property
    def name(self) -> str:
        blocks = self.vit_cpu_blocks
        if blocks is None:
            blocks = bool(getattr(self.module, "cpu_bf16_blocks", False))
        fast = blocks and has_vit_cpu_blocks(self.module)
        return (
            "vit_cpu"
            if fast and self.device.type == "cpu" and self.precision == "bf16"
            else "torch"
        )

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with _cpu_bf16_blocks(self.module, self.vit_cpu_blocks):
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self.module(batch)
            else:
                out = self.module(batch)
        return out.float().cpu().numpy()


@torch.inference_mode()
def fp32_reference(module: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    """The module's fp32 features on CPU: what every exported runtime is checked against."""
    device = next(module.parameters()).device
    out = module(batch.to(device, dtype=torch.float32))
    return out.float().cpu().numpy()
