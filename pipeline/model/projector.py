"""Projectors from the vision tower's patch grid into the LM's embedding space.

Registry in the style of LLaVA's projector builder: a name in the config picks the class,
`build_projector(name, vision_dim, lm_dim, **options)` makes it (`model.projector_options` in
the config). Every projector takes (images, patches, vision_dim) features and a token count N
and returns (images, N, lm_dim).
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

PROJECTORS = {}


def register_projector(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        PROJECTORS[name] = cls
        return cls

    return add


def build_projector(name: str, vision_dim: int, lm_dim: int, **options: object) -> nn.Module:
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; registered: {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_dim, lm_dim, **options)


def square_side(count: int, what: str) -> int:
    side = math.isqrt(count) if count > 0 else 0
    if side < 1 or side * side != count:
        raise ValueError(f"{what}={count} is not a perfect square n*n with n >= 1 (e.g. 64, 144, 256)")
    return side


def pooled_side(num_tokens: int, grid: int) -> int:
    """n for N = n*n tokens pooled from a grid x grid patch map; ValueError naming N otherwise."""
    side = square_side(num_tokens, "num_vision_tokens")
    if side > grid:
        raise ValueError(
            f"num_vision_tokens={num_tokens} asks for a {side}x{side} grid, "
            f"larger than the encoder's {grid}x{grid} patches (at most {grid * grid})"
        )
    return side


def adaptive_average(grid_map: torch.Tensor, side: int) -> torch.Tensor:
    """torch's adaptive average pooling: output cell i averages input rows floor(i*g/n) to
    ceil((i+1)*g/n), so when n does not divide the grid g, neighbouring cells overlap."""
    return F.adaptive_avg_pool2d(grid_map, side)


def resize_then_average(grid_map: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of the grid up to the next multiple of n, then n x n equal blocks
    averaged: the pooling of the TokenFLEX authors' public code (Ristretto's projector)."""
    grid = grid_map.shape[-1]
    size = math.ceil(grid / side) * side
    if size != grid:
        grid_map = F.interpolate(grid_map, size=(size, size), mode="bilinear", align_corners=True)
    return F.avg_pool2d(grid_map, size // side)


POOLINGS = {"adaptive": adaptive_average, "resize_avg": resize_then_average}


@register_projector("adaptive_pool_swiglu")
class AdaptivePoolSwiGLUProjector(nn.Module):
    """TokenFLEX's token-adaptive projector: pool the grid to n x n, then norm and SwiGLU.

    pooling: "adaptive" (adaptive average pooling) or "resize_avg" (resize, then average). The
    two agree whenever n divides the grid (16x16 -> 4, 8 or 16 per side).
    """

    def __init__(self, vision_dim: int, lm_dim: int, hidden_dim: int | None = None, pooling: str = "adaptive"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown projector pooling {pooling!r}; choose from {sorted(POOLINGS)}")
        self.pool = POOLINGS[pooling]
        hidden_dim = hidden_dim or lm_dim
        self.norm = nn.LayerNorm(vision_dim)
        self.gate = nn.Linear(vision_dim, hidden_dim, bias=False)
        self.up = nn.Linear(vision_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, lm_dim, bias=False)

    def forward(self, features: torch.Tensor, num_tokens: int) -> torch.Tensor:
        images, patches, dim = features.shape
        grid = square_side(patches, "vision patch count")
        side = pooled_side(num_tokens, grid)
        grid_map = features.transpose(1, 2).reshape(images, dim, grid, grid)
        pooled = self.pool(grid_map, side).flatten(2).transpose(1, 2)
        x = self.norm(pooled)
        return self.down(F.silu(self.gate(x)) * self.up(x))


@register_projector("mlp2x_gelu")
class MLPProjector(nn.Module):
    """LLaVA-1.5's projector: every patch becomes one token, so N is fixed to the patch count."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, features: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if num_tokens != features.shape[1]:
            raise ValueError(
                f"the mlp2x_gelu projector has a fixed token count of {features.shape[1]} "
                f"(one per patch); got num_vision_tokens={num_tokens}"
            )
        return self.net(features)

