"""Image decoding, aligned preprocessing, batching and bf16 vs fp32 features."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalydino_core.backbones import build_backbone, get_backbone_spec
from anomalydino_core.features import PatchFeatureExtractor, to_input_tensor
from anomalydino_core.images import ImageDecodeError, decode_image
from tasks.image_files import read_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decodes_every_mode_to_rgb_uint8():
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8), "RGBA")
    g16_arr = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    g16 = Image.fromarray(g16_arr)
    pal = gray.convert("P")
    for img in (gray, rgba, g16, pal):
        out = decode_image(_png(img), "x.png")
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    out16 = decode_image(_png(g16), "g16.png")
    # 16-bit is scaled by its full range, not clipped at 255
    expected = np.rint(g16_arr / 65535.0 * 255).astype(np.uint8)
    assert np.array_equal(out16[..., 0], expected)
    assert len(np.unique(out16)) > 50
    out_rgba = decode_image(_png(rgba), "a.png")
    a = np.asarray(rgba).astype(np.float64)
    comp = np.rint(a[..., :3] * a[..., 3:] / 255.0)
    assert np.abs(out_rgba.astype(int) - comp).max() <= 1


def test_plain_pngs_take_the_opencv_path_and_decode_exactly_like_pil(monkeypatch):
    import anomalydino_core.images as images

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (21, 33, 3), dtype=np.uint8), "RGB")
    for img in (rgb, rgb.convert("L"), rgb.convert("P")):
        data = _png(img)
        fast = images._decode_plain_png(data)
        assert fast is not None  # 8-bit grey, RGB and opaque palette PNGs use libpng directly
        assert np.array_equal(fast, np.asarray(img.convert("RGB")))  # channel order included
        assert np.array_equal(decode_image(data), fast)
    # a PNG the fast path refuses (alpha) still decodes, through PIL
    assert images._decode_plain_png(_png(rgb.convert("RGBA"))) is None
    # truncated anywhere inside the pixel data: an error, never a partial image
    data = _png(rgb)
    for cut in (40, len(data) // 2, len(data) - 40):
        assert images._decode_plain_png(data[:cut]) is None
        with pytest.raises(ImageDecodeError, match="cut.png"):
            decode_image(data[:cut], "cut.png")


def test_bad_inputs_name_the_item():
    with pytest.raises(ImageDecodeError, match="empty.png: empty file"):
        decode_image(b"", "empty.png")
    with pytest.raises(ImageDecodeError, match="notes.txt: not a recognised image"):
        decode_image(b"hello, not an image", "notes.txt")
    good = _png(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7))
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_image(good[: len(good) // 2], "cut.png")


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("dinov2_vits14", (900, 900), (448, 448)),
        ("dinov2_vits14", (600, 800), (448, 602)),  # 597.3 -> nearest multiple of 14
        ("dinov2_vits14", (1000, 500), (896, 448)),
        ("efficientnet_lite0", (600, 800), (448, 608)),
        ("dinov2_vits14", (10, 3000), (448, 134400)),
    ],
)
def test_input_size_keeps_the_whole_image_on_an_aligned_grid(name, size, expected):
    cfg = get_backbone_spec(name).preprocess(448)
    assert cfg.input_size(size) == expected
    h, w = expected
    assert h % cfg.patch_size == 0 and w % cfg.patch_size == 0


def test_resolution_must_fit_the_patch_size():
    with pytest.raises(ValueError, match="multiple of 14"):
        get_backbone_spec("dinov2_vits14").preprocess(450)


def test_input_tensor_is_normalised_whole_image():
    cfg = get_backbone_spec("dinov2_vits14").preprocess(448)
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 390:] = 255  # a stripe at the right edge must survive (no content cut)
    x = to_input_tensor(img, cfg)
    assert x.shape == (3, 448, 602)
    right = x[:, :, -4:].mean().item()
    assert right > 1.0  # white after ImageNet normalisation


@pytest.mark.parametrize("shape", [(448, 448, 3), (300, 400, 3)])
def test_input_tensor_reads_the_image_without_writing_it(shape):
    """In-place normalisation works on tensors of its own: a read-only image is accepted and
    left as it was; at the input size the values are (x / 255 - mean) / std, as float32."""
    cfg = get_backbone_spec("dinov2_vits14").preprocess(448)
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    frozen = img.copy()
    frozen.flags.writeable = False
    x = to_input_tensor(frozen, cfg)
    assert np.array_equal(frozen, img)
    assert torch.equal(x, to_input_tensor(img, cfg)) and np.array_equal(frozen, img)
    if shape[:2] == (448, 448):
        mean = torch.tensor(cfg.mean).view(3, 1, 1)
        std = torch.tensor(cfg.std).view(3, 1, 1)
        dense = (torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0 - mean) / std
        assert torch.equal(x, dense)


@pytest.mark.parametrize("name", ["dinov2_vits14", "efficientnet_lite0"])
def test_resize_matches_pil_like_the_official_preprocessing(mvtec_root, name):
    """The 8-bit resize is PIL's bicubic (what torchvision does to PIL images) within one grey
    level; the float resize, kept as an option, is several levels off."""
    path = sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[0]
    pil = Image.open(path).convert("RGB")
    cfg = get_backbone_spec(name).preprocess(448)
    assert cfg.resize_dtype == "uint8" and cfg.interpolation == "bicubic"
    size = cfg.input_size((pil.height, pil.width))
    resized = np.asarray(pil.resize(size[::-1], Image.BICUBIC), np.float32) / 255.0
    reference = (resized - np.float32(cfg.mean)) / np.float32(cfg.std)

    def grey_levels_off(c) -> np.ndarray:
        x = to_input_tensor(np.asarray(pil), c).permute(1, 2, 0).numpy()
        return np.abs(x - reference) * np.float32(cfg.std) * 255.0

    off = grey_levels_off(cfg)
    assert off.max() <= 1.001 and off.mean() < 0.01, (off.max(), off.mean())
    assert grey_levels_off(replace(cfg, resize_dtype="float32")).max() > 2.0
    with pytest.raises(ValueError, match="resize_dtype"):
        replace(cfg, resize_dtype="float16")


def test_cpu_batches_are_capped_per_backbone(effnet):
    """On CPU DINOv2 runs 2 images per forward pass and EfficientNet-Lite0 one (measured, see
    ``DINOV2_CPU_BATCH``), whatever the configured batch; smaller batches stay as configured."""
    vit = build_backbone("dinov2_vits14")
    assert PatchFeatureExtractor(vit, resolution=224, batch_size=8).batch_size == 2
    assert PatchFeatureExtractor(vit, resolution=224, batch_size=1).batch_size == 1
    assert PatchFeatureExtractor(effnet, resolution=224, batch_size=8).batch_size == 1


def test_batching_matches_one_by_one():
    b = build_backbone("dinov2_vits14")
    ex = PatchFeatureExtractor(b, resolution=224, precision="fp32", batch_size=3)
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for _ in range(4)]
    imgs.append(rng.integers(0, 255, (200, 100, 3), dtype=np.uint8))  # other size, own batch
    batched = ex.embed(imgs)
    single = [ex.embed_one(i) for i in imgs]
    assert batched[4].shape == (32, 16, 384)
    for a, s in zip(batched, single, strict=True):
        assert np.allclose(a, s, atol=1e-4)


def test_bf16_features_match_fp32_on_real_images(mvtec_root, effnet):
    paths = sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[:4]
    imgs = [read_image(p) for p in paths]
    f32 = PatchFeatureExtractor(effnet, precision="fp32").embed(imgs)
    b16 = PatchFeatureExtractor(effnet, precision="bf16").embed(imgs)
    for a, b in zip(f32, b16, strict=True):
        a2, b2 = torch.from_numpy(a.reshape(-1, 152)), torch.from_numpy(b.reshape(-1, 152))
        cos = torch.nn.functional.cosine_similarity(a2, b2, dim=-1)
        assert cos.min().item() >= 0.999, cos.min().item()


def test_settings_record_identity_and_preprocessing(effnet):
    ex = PatchFeatureExtractor(effnet, resolution=672, precision="fp32")
    s = ex.settings.to_dict()
    assert s["backbone"] == "efficientnet_lite0"
    assert s["weights_sha256"] == effnet.identity.weights_sha256
    assert s["preprocess"]["resolution"] == 672 and s["preprocess"]["patch_size"] == 16
    assert s["precision"] == "fp32"
