"""DrQ's random-shift augmentation for uint8 pixel stacks."""

from __future__ import annotations

import torch


def random_shift(pixels: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Shift each image by up to ±pad pixels with edge replication (DrQ).  (B, C, H, W) -> (B, C, H, W), same dtype.

    Clamped indices equal replicate padding followed by a random crop, without materialising the padded image.
    """
    if pad <= 0:
        return pixels
    batch, _, height, width = pixels.shape
    device = pixels.device
    shift_y = torch.randint(-pad, pad + 1, (batch, 1), device=device)
    shift_x = torch.randint(-pad, pad + 1, (batch, 1), device=device)
    rows = (torch.arange(height, device=device) + shift_y).clamp_(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=device) + shift_x).clamp_(0, width - 1)  # (B, W)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(pixels.shape[1], device=device)[None, :, None, None]
    return pixels[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
