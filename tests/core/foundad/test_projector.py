"""The manifold projector: size, shapes, the global skip, and parity with anomalib 2.7.0's port
(same initialisation for the same seed, same outputs for the same weights)."""

from __future__ import annotations

import pytest
import torch

from anomalydino_core.foundad.projector import (
    ManifoldProjector,
    ProjectorConfig,
    count_parameters,
    from_anomalib_state_dict,
)

from .anomalib_source import ensure_anomalib_source, load_anomalib_projector


def test_parameter_count_is_the_papers_11_2m_for_vit_b_tokens():
    projector = ManifoldProjector(ProjectorConfig(embed_dim=768))
    # 2 x (768 x 384 + bias) + 6 blocks x (12 x 384^2 + 13 x 384 + 1536) + final LayerNorm
    assert count_parameters(projector) == 11_238_528
    assert 10.5e6 < count_parameters(ManifoldProjector(ProjectorConfig(embed_dim=112))) < 11e6


def test_shapes_grid_or_sequence_and_width_checked():
    projector = ManifoldProjector(ProjectorConfig(embed_dim=40, width=48, depth=2, num_heads=4))
    with torch.no_grad():
        grid = torch.randn(2, 3, 5, 40)
        out = projector(grid)
        assert out.shape == grid.shape
        torch.testing.assert_close(out.reshape(2, 15, 40), projector(grid.reshape(2, 15, 40)))
        assert projector(torch.randn(1, 7, 40)).shape == (1, 7, 40)  # any token count
    with pytest.raises(ValueError, match="width"):
        projector(torch.randn(1, 4, 41))


def test_global_skip_adds_the_embedded_input_after_every_block():
    torch.manual_seed(0)
    projector = ManifoldProjector(ProjectorConfig(embed_dim=16, width=24, depth=3, num_heads=3))
    projector.eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        x0 = projector.embed(x)
        h = x0
        for block in projector.blocks:
            h = block(h) + x0
        expected = projector.head(projector.norm(h))
        chained = x0
        for block in projector.blocks:
            chained = block(chained)
        without_skip = projector.head(projector.norm(chained + x0))
        torch.testing.assert_close(projector(x), expected, rtol=0, atol=0)
        assert not torch.allclose(projector(x), without_skip, atol=1e-4)


def test_anomalib_key_mapping_rejects_unknown_tensors():
    with pytest.raises(KeyError, match="predictor_pos_embed"):
        from_anomalib_state_dict({"predictor_pos_embed": torch.zeros(1)})


@pytest.fixture(scope="module")
def anomalib_projector():
    """anomalib 2.7.0's class (its source installed once with pip --no-deps, see the helper)."""
    return load_anomalib_projector(ensure_anomalib_source())


@pytest.mark.parametrize("embed_dim", [768, 112])
def test_same_seed_gives_anomalibs_initialisation_bit_for_bit(anomalib_projector, embed_dim):
    torch.manual_seed(5)
    theirs = anomalib_projector(num_patches=16, embed_dim=embed_dim)
    torch.manual_seed(5)
    ours = ManifoldProjector(ProjectorConfig(embed_dim=embed_dim))
    mapped = from_anomalib_state_dict(theirs.state_dict())
    assert mapped.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, mapped[key]), key
    assert count_parameters(ours) == count_parameters(theirs)


@pytest.mark.parametrize("embed_dim", [768, 112])
def test_forward_equals_anomalibs_for_the_same_weights(anomalib_projector, embed_dim):
    torch.manual_seed(1)
    theirs = anomalib_projector(num_patches=16, embed_dim=embed_dim).eval()
    with torch.no_grad():  # move away from the initialisation (as training would): biases,
        for p in theirs.parameters():  # norms and scales all differ from their initial values
            p.mul_(1.0 + 0.2 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    ours = ManifoldProjector(ProjectorConfig(embed_dim=embed_dim)).eval()
    ours.load_state_dict(from_anomalib_state_dict(theirs.state_dict()), strict=True)
    x = 2.0 * torch.randn(2, 196, embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert expected.std() > 0.1  # not a trivially small output
        # and a perturbed weight is noticed
        # (a random vector: LayerNorms remove a constant shift exactly)
        ours.blocks[3].mlp.fc2.bias.add_(1e-2 * torch.randn(384))
        assert (ours(x) - expected).abs().max() > 1e-4
