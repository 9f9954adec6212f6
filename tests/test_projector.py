"""Projector registry, shapes, pooling and error messages (random features, no checkpoints)."""

import pytest
import torch
from torch.nn import functional as F

from pipeline.model.projector import (
    PROJECTORS,
    AdaptivePoolSwiGLUProjector,
    MLPProjector,
    build_projector,
    resize_then_average,
)

VISION_DIM, LM_DIM = 24, 40


@pytest.fixture(scope="module")
def pool_projector():
    torch.manual_seed(0)
    return build_projector("adaptive_pool_swiglu", VISION_DIM, LM_DIM)


def features(grid, images=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(images, grid * grid, VISION_DIM, generator=generator)


@pytest.mark.parametrize("grid", [27, 16])
@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64, 144, 256])
def test_adaptive_pool_output_shape(pool_projector, grid, num_tokens):
    out = pool_projector(features(grid, images=3), num_tokens)
    assert out.shape == (3, num_tokens, LM_DIM)
    assert torch.isfinite(out).all()


def capture_norm_input(projector, feats, num_tokens):
    captured = {}
    handle = projector.norm.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    try:
        projector(feats, num_tokens)
    finally:
        handle.remove()
    return captured["x"]


@pytest.mark.parametrize("grid", [27, 16])
def test_pooling_to_full_grid_is_identity(pool_projector, grid):
    feats = features(grid)
    pooled = capture_norm_input(pool_projector, feats, grid * grid)
    assert torch.equal(pooled, feats)


def test_pooling_averages_spatial_blocks_in_row_major_order(pool_projector):
    """16x16 -> 4x4: each output token is the mean of one 4x4 block of the row-major patch grid."""
    feats = features(16, images=2)
    pooled = capture_norm_input(pool_projector, feats, 16)
    grid = feats.reshape(2, 16, 16, VISION_DIM)  # (image, row, col, dim)
    blocks = grid.reshape(2, 4, 4, 4, 4, VISION_DIM).mean(dim=(2, 4)).reshape(2, 16, VISION_DIM)
    torch.testing.assert_close(pooled, blocks)
    # and the same as torch's adaptive pooling on the (dim, row, col) map, for a non-divisible 27x27 grid
    feats27 = features(27, images=2, seed=1)
    pooled27 = capture_norm_input(pool_projector, feats27, 64)
    reference = F.adaptive_avg_pool2d(feats27.transpose(1, 2).reshape(2, VISION_DIM, 27, 27), 8)
    torch.testing.assert_close(pooled27, reference.flatten(2).transpose(1, 2))


def bilinear_matrix(size_in, size_out):
    """(size_out, size_in) weights of 1-D linear interpolation with the end points aligned."""
    weights = torch.zeros(size_out, size_in)
    for i in range(size_out):
        x = i * (size_in - 1) / (size_out - 1)
        left = min(int(x), size_in - 2)
        weights[i, left], weights[i, left + 1] = left + 1 - x, x - left
    return weights


@pytest.mark.parametrize(("grid", "side", "resized"), [(16, 6, 18), (16, 10, 20), (16, 12, 24), (27, 8, 32)])
def test_resize_avg_pooling_resizes_bilinearly_then_averages_equal_blocks(grid, side, resized):
    """Worked by hand: the grid is stretched to the next multiple of n (rows and columns
    interpolated linearly, corners kept), then each (resized/n)^2 block is averaged."""
    feats = features(grid, images=2)
    projector = build_projector("adaptive_pool_swiglu", VISION_DIM, LM_DIM, pooling="resize_avg")
    pooled = capture_norm_input(projector, feats, side * side)
    rows = bilinear_matrix(grid, resized)
    grid_map = feats.reshape(2, grid, grid, VISION_DIM)
    stretched = torch.einsum("ar,bc,irch->iabh", rows, rows, grid_map)
    block = resized // side
    expected = stretched.reshape(2, side, block, side, block, VISION_DIM).mean(dim=(2, 4)).reshape(2, -1, VISION_DIM)
    torch.testing.assert_close(pooled, expected)
    # it is a different pooling from the adaptive one, whose cells overlap instead
    adaptive = capture_norm_input(build_projector("adaptive_pool_swiglu", VISION_DIM, LM_DIM), feats, side * side)
    assert not torch.allclose(pooled, adaptive, atol=1e-3)


@pytest.mark.parametrize("side", [1, 2, 4, 8, 16])
def test_both_poolings_agree_when_n_divides_the_grid(side):
    feats = features(16).transpose(1, 2).reshape(2, VISION_DIM, 16, 16)
    torch.testing.assert_close(resize_then_average(feats, side), F.adaptive_avg_pool2d(feats, side))


def test_unknown_pooling_errors_naming_it():
    with pytest.raises(ValueError, match="pooling 'max'.*adaptive.*resize_avg"):
        build_projector("adaptive_pool_swiglu", VISION_DIM, LM_DIM, pooling="max")


def test_different_n_give_different_pooling(pool_projector):
    feats = features(16)
    assert not torch.allclose(pool_projector(feats, 1).mean(1), pool_projector(feats, 256).mean(1))


def test_registry_builds_both_projectors():
    assert {"adaptive_pool_swiglu", "mlp2x_gelu"} <= set(PROJECTORS)
    pool = build_projector("adaptive_pool_swiglu", VISION_DIM, LM_DIM, hidden_dim=7)
    assert isinstance(pool, AdaptivePoolSwiGLUProjector)
    assert pool.gate.out_features == 7 and pool.down.out_features == LM_DIM
    mlp = build_projector("mlp2x_gelu", VISION_DIM, LM_DIM)
    assert isinstance(mlp, MLPProjector)
    assert mlp(features(16), 256).shape == (2, 256, LM_DIM)


def test_unknown_projector_name_errors_naming_it():
    with pytest.raises(ValueError, match="no_such_projector"):
        build_projector("no_such_projector", VISION_DIM, LM_DIM)


@pytest.mark.parametrize("num_tokens", [64, 255, 257])
def test_mlp_projector_rejects_other_token_counts(num_tokens):
    mlp = build_projector("mlp2x_gelu", VISION_DIM, LM_DIM)
    with pytest.raises(ValueError, match=rf"fixed token count of 256.*num_vision_tokens={num_tokens}\b"):
        mlp(features(16), num_tokens)


@pytest.mark.parametrize("num_tokens", [50, 2, 143])
def test_non_square_token_count_errors_naming_value(pool_projector, num_tokens):
    with pytest.raises(ValueError, match=rf"num_vision_tokens={num_tokens} is not a perfect square"):
        pool_projector(features(16), num_tokens)


@pytest.mark.parametrize(("grid", "num_tokens"), [(16, 289), (16, 729), (27, 784)])
def test_more_tokens_than_patches_errors(pool_projector, grid, num_tokens):
    with pytest.raises(ValueError, match=rf"num_vision_tokens={num_tokens}.*larger than the encoder's {grid}x{grid}"):
        pool_projector(features(grid), num_tokens)


def test_non_square_patch_count_errors(pool_projector):
    with pytest.raises(ValueError, match="vision patch count=50"):
        pool_projector(torch.randn(1, 50, VISION_DIM), 4)
