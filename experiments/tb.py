"""TensorBoard helpers: a purge-aware SB3 output format, GIF video summaries without moviepy, heatmaps.

torch's `SummaryWriter.add_video` (behind SB3's `Video`) imports `moviepy.editor`, which moviepy 2 removed; with
moviepy 2 installed the video is silently dropped. We encode the GIF with Pillow and write the same summary
proto (an image summary holding an animated GIF, which TensorBoard's Images tab plays).
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image
from stable_baselines3.common.logger import TensorBoardOutputFormat
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

matplotlib.use("Agg")


class PurgingTensorBoardFormat(TensorBoardOutputFormat):
    """SB3's TensorBoard output with `purge_step`: on resume, events logged after the checkpoint are dropped."""

    def __init__(self, folder: str, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self._is_closed = False


def video_summary(tag: str, frames: np.ndarray, fps: int = 15) -> Summary:
    """frames (T, H, W, 3) uint8 -> an animated-GIF image summary."""
    frames = np.asarray(frames, dtype=np.uint8)
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0
    )
    height, width = frames.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def add_video(writer: SummaryWriter, tag: str, frames: np.ndarray, step: int, fps: int = 15) -> None:
    writer._get_file_writer().add_summary(video_summary(tag, frames, fps), step)


def attention_figure(weights: np.ndarray, names: list[str], counts: list[int]):
    """A latents x tokens heatmap with tokens grouped (and labelled) by modality."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.2), dpi=80)
    axis.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
    edges = np.cumsum([0, *counts])
    for edge in edges[1:-1]:
        axis.axvline(edge - 0.5, color="white", linewidth=1)
    axis.set_xticks((edges[:-1] + edges[1:]) / 2 - 0.5, names)
    axis.set_ylabel("latent")
    axis.set_title("cross-attention (head mean, sample 0)")
    figure.tight_layout()
    return figure


def attention_overlay(
    pixels: np.ndarray, heat: np.ndarray, scale: int = 2, alpha: float = 0.55
) -> np.ndarray:
    """The stacked frames side by side (oldest first) with the attention on their tokens blended over them.

    pixels (F*3, H, W) uint8; heat (F, Hp, Wp) attention mass per patch of each frame (patch tokens), or (Hp, Wp)
    per cell of a conv feature map that read the whole stack (conv tokens: the same map over every frame) ->
    (H*scale, F*W*scale, 3) uint8. Each pixel takes the value of the cell that covers it (cells need not divide
    the image evenly: 11 conv cells over 84 px). The colour scale is shared across frames (max of the stack), so
    a frame the latents ignore stays dark."""
    import matplotlib.pyplot as plt

    frames = np.asarray(pixels).reshape(-1, 3, *pixels.shape[-2:]).transpose(0, 2, 3, 1)  # (F, H, W, 3)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim == 2:
        heat = np.broadcast_to(heat, (frames.shape[0], *heat.shape))
    height, width = frames.shape[1:3]
    rows = np.minimum(np.arange(height) * heat.shape[1] // height, heat.shape[1] - 1)
    cols = np.minimum(np.arange(width) * heat.shape[2] // width, heat.shape[2] - 1)
    upsampled = heat[:, rows][:, :, cols] / max(float(heat.max()), 1e-12)
    colours = plt.get_cmap("inferno")(upsampled)[..., :3] * 255.0  # (F, H, W, 3)
    blended = (1 - alpha) * frames.astype(np.float32) + alpha * colours
    strip = np.concatenate(list(blended.clip(0, 255).astype(np.uint8)), axis=1)  # (H, F*W, 3)
    return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def keypoint_overlay(
    pixels: np.ndarray, places: np.ndarray, mass: np.ndarray, scale: int = 2, max_radius: float = 6.0
) -> np.ndarray:
    """The stacked frames side by side (oldest first) with each keypoint drawn where it sits, as a disc whose
    area and colour grow with the cross-attention mass it receives.

    pixels (F*3, H, W) uint8; places (G, K, 2) (x, y) in pixels; mass (G, K); G = F (each frame's own keypoints)
    or 1 (keypoints of the whole stack, drawn on every frame) -> (H*scale, F*W*scale, 3) uint8. The colour scale
    is shared across frames (max of the stack), as in `attention_overlay`; a keypoint with no mass is a dot."""
    import matplotlib.pyplot as plt

    frames = np.asarray(pixels).reshape(-1, 3, *pixels.shape[-2:]).transpose(0, 2, 3, 1)  # (F, H, W, 3)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2).astype(np.float32)
    places, mass = np.asarray(places, dtype=np.float32), np.asarray(mass, dtype=np.float32)
    if places.shape[0] == 1:
        places = np.broadcast_to(places, (frames.shape[0], *places.shape[1:]))
        mass = np.broadcast_to(mass, (frames.shape[0], *mass.shape[1:]))
    share = mass / max(float(mass.max()), 1e-12)
    colours = plt.get_cmap("inferno")(0.25 + 0.75 * share)[..., :3] * 255.0  # (F, K, 3)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]] + 0.5
    for frame, frame_places, frame_share, frame_colours in zip(frames, places, share, colours):
        for k in np.argsort(frame_share, kind="stable"):  # the heaviest drawn last, on top
            x, y = frame_places[k] * scale
            radius = 1.0 + (max_radius * scale - 1.0) * np.sqrt(frame_share[k])
            frame[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = frame_colours[k]
    return np.concatenate(list(frames.clip(0, 255).astype(np.uint8)), axis=1)  # (H*scale, F*W*scale, 3)


def attention_on_image(encoder, capture: dict, pixels) -> np.ndarray | None:
    """One sample's frames with the latents' cross-attention drawn on them: heat over the patches or conv cells
    (`attention_overlay`), or the keypoints where they sit (`keypoint_overlay`); None where the encoder's pixel
    tokens have no place on the image (or the capture has no pixels). pixels: (F*3, H, W) uint8, numpy or torch,
    the sample the capture came from."""
    import torch

    from perceiver_policy.introspection import attention_on_frames, keypoints_on_frames

    frames = pixels.cpu() if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
    heat = attention_on_frames(capture, encoder.specs)
    if heat is not None:
        return attention_overlay(frames.numpy(), heat.cpu().numpy())
    device = next(encoder.parameters()).device
    keypoints = keypoints_on_frames(encoder, capture, frames[None].to(device))
    if keypoints is None:
        return None
    places, mass = keypoints
    return keypoint_overlay(frames.numpy(), places.cpu().numpy(), mass.cpu().numpy())
