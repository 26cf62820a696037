"""Fourier position features (Perceiver IO): computed once per token layout, kept as buffers."""

from __future__ import annotations

import torch


def fourier_dim(num_axes: int, num_bands: int) -> int:
    """Features per token for `num_axes` position axes: the raw position plus sin and cos per band."""
    return num_axes * (2 * num_bands + 1)


def grid_positions(resolutions: tuple[int, ...]) -> torch.Tensor:
    """All grid points of a `resolutions` grid, row-major, each axis spanning [-1, 1].  # (N, len(resolutions))"""
    axes = [torch.linspace(-1.0, 1.0, r) if r > 1 else torch.zeros(1) for r in resolutions]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


def fourier_features(positions: torch.Tensor, resolutions: tuple[int, ...], num_bands: int) -> torch.Tensor:
    """Perceiver IO's encoding: per axis, [x, sin(pi f x), cos(pi f x)] for f linearly spaced in [1, r/2].

    The same rule for every modality keeps frequency sampling consistent: an axis with r positions gets bands
    up to its Nyquist frequency r/2 (at least 1). positions: (N, A) in [-1, 1] -> (N, A * (2 * num_bands + 1)).
    """
    if positions.shape[-1] != len(resolutions):
        raise ValueError(
            f"positions have {positions.shape[-1]} axes but {len(resolutions)} resolutions were given"
        )
    features = [positions]
    if num_bands > 0:
        for axis, resolution in enumerate(resolutions):
            freqs = torch.linspace(1.0, max(resolution / 2.0, 1.0), num_bands)  # (K,)
            angles = torch.pi * positions[:, axis : axis + 1] * freqs  # (N, K)
            features += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(features, dim=-1)


def grid_fourier_features(resolutions: tuple[int, ...], num_bands: int) -> torch.Tensor:
    """Fourier features of every point of a grid, row-major.  # (prod(resolutions), A * (2K + 1))"""
    return fourier_features(grid_positions(resolutions), resolutions, num_bands)
