"""Read background, colour and shape back from a picture's pixels alone (docs/shapes.md).

- background: the palette background nearest the median of the border pixels;
- colour: the palette colour nearest the median of the pixels that differ from the background;
- shape: how much of its bounding box the shape fills (square ~1.0, circle ~pi/4, triangle ~0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.shapes import BACKGROUNDS, COLOURS

# A pixel "differs from the background" when some channel is this far off it (0-255 scale).
DIFFERS_THRESHOLD = 60
# Fill ratio boundaries: triangle 0.5 | circle 0.785 | square 1.0.
TRIANGLE_CIRCLE_SPLIT = 0.64
CIRCLE_SQUARE_SPLIT = 0.89


@dataclass(frozen=True)
class Readback:
    background: str
    colour: str | None  # None: no pixel differs from the background
    shape: str | None
    fill_ratio: float

    def matches(self, colour: str, shape: str, background: str) -> dict[str, bool]:
        return {
            "colour": self.colour == colour,
            "shape": self.shape == shape,
            "background": self.background == background,
        }


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [float(np.sum((rgb - np.asarray(palette[name], dtype=np.float64)) ** 2)) for name in names]
    return names[int(np.argmin(distances))]


def _as_array(picture: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 on the 0-255 scale; float inputs are taken as [0, 1]."""
    if isinstance(picture, Image.Image):
        return np.asarray(picture.convert("RGB"), dtype=np.float64)
    array = np.asarray(picture)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"picture must be (H, W, 3), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    return array.astype(np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (stray pixels must not widen the box)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        label += 1
        labels[y, x] = label
        stack, size = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label


def read_back(picture: Image.Image | np.ndarray) -> Readback:
    pixels = _as_array(picture)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    background_rgb = np.asarray(BACKGROUNDS[background], dtype=np.float64)

    differs = np.abs(pixels - background_rgb).max(axis=-1) > DIFFERS_THRESHOLD
    if not differs.any():
        return Readback(background, None, None, 0.0)
    colour = _nearest(np.median(pixels[differs], axis=0), COLOURS)

    # The shape's own pixels: nearer its colour than the background (the anti-aliased edge splits
    # half and half, so the mask's area is the shape's true area).
    colour_rgb = np.asarray(COLOURS[colour], dtype=np.float64)
    nearer_colour = np.sum((pixels - colour_rgb) ** 2, axis=-1) < np.sum((pixels - background_rgb) ** 2, axis=-1)
    shape_mask = _largest_component(nearer_colour)
    rows, cols = np.nonzero(shape_mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill_ratio = float(shape_mask.sum()) / float(box_area)
    if fill_ratio < TRIANGLE_CIRCLE_SPLIT:
        shape = "triangle"
    elif fill_ratio < CIRCLE_SQUARE_SPLIT:
        shape = "circle"
    else:
        shape = "square"
    return Readback(background, colour, shape, fill_ratio)
