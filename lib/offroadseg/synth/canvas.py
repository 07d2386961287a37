"""What every painter draws with: the per-image Scene, the noise bank, polygons and shadows.

A painter (`objects`, and `scene`'s background) gets a `Scene` holding the image, the label map,
the image's random generator, its domain and its camera and sun, and writes pixels and labels
together through `Scene.paint`, so a label is never out of step with its pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..classes import CLASS_NAMES, NUM_CLASSES

# Class indices, by name, for readability in the painters.
TREES, LUSH, GRASS, DRYBUSH, CLUTTER, FLOWERS, LOGS, ROCKS, LAND, SKY = range(NUM_CLASSES)
assert CLASS_NAMES[FLOWERS] == "Flowers" and CLASS_NAMES[SKY] == "Sky"


# ----------------------------------------------------------------------------------------------
# Noise bank: textures generated once per process and cropped at random offsets per object,
# because generating noise per object would dominate the render time.
# ----------------------------------------------------------------------------------------------

BANK_MARGIN = 160  # pixels of slack around the frame for random crop offsets


def _value_noise(rng: np.random.Generator, h: int, w: int, cell_x: float, cell_y: float) -> np.ndarray:
    """Smooth noise with features about cell_x by cell_y pixels (bicubic-upsampled random grid)."""
    cell_x, cell_y = max(cell_x, 1.0), max(cell_y, 1.0)
    gw, gh = int(np.ceil(w / cell_x)) + 4, int(np.ceil(h / cell_y)) + 4
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = np.asarray(Image.fromarray(grid).resize((int(gw * cell_x), int(gh * cell_y)), Image.BICUBIC))
    oy, ox = int(cell_y), int(cell_x)  # skip the border, where bicubic resampling is one-sided
    return big[oy:oy + h, ox:ox + w]


def _fractal(rng, h, w, cell, octaves=3, persistence=0.5, aspect=1.0) -> np.ndarray:
    total = np.zeros((h, w), np.float32)
    amp = 1.0
    for octave in range(octaves):
        c = cell / 2**octave
        total += amp * _value_noise(rng, h, w, c, c * aspect)
        amp *= persistence
    total -= total.mean()
    total /= total.std() + 1e-6
    return total


@functools.lru_cache(maxsize=2)
def noise_bank(seed: int, width: int, height: int) -> dict[str, np.ndarray]:
    """Zero-mean, unit-variance textures slightly larger than the frame; feature sizes scale with it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    u = height / 540.0
    h, w = height + BANK_MARGIN, width + BANK_MARGIN
    return {
        "large": _fractal(rng, h, w, 160 * u, octaves=4),  # clouds, dune shading
        "mid": _fractal(rng, h, w, 28 * u, octaves=3),  # canopy lumps, patch boundaries
        "leaf": _fractal(rng, h, w, 5.5 * u, octaves=2, persistence=0.35),  # leaves
        "speck": _value_noise(rng, h, w, 3.5 * u, 3.5 * u) / 0.45,  # pebbles, debris
        "streak": _fractal(rng, h, w, 3.2 * u, octaves=2, persistence=0.4, aspect=9.0),  # grass blades
        "grain": _value_noise(rng, h, w, 1.0, 1.0),  # sensor noise and sand grain
    }


# ----------------------------------------------------------------------------------------------
# Scene state and small drawing helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class Scene:
    img: np.ndarray  # (H, W, 3) float32 in [0, 1]-ish
    lab: np.ndarray  # (H, W) uint8 class indices
    rng: np.random.Generator
    bank: dict
    dom: dict
    width: int
    height: int
    u: float  # pixels per pixel of a 540-high frame
    horizon: float  # horizon row at the frame centre
    slope: float  # horizon roll (rows per column)
    unit: float  # pixels per world unit at the bottom row
    sun_side: float  # -1 sun on the left .. +1 on the right
    light: np.ndarray  # unit 2-D light direction in image coordinates (y down)
    shadow_len: float  # shadow length per unit of object height
    haze_colour: np.ndarray
    haze: float
    sand: np.ndarray | None = None  # this image's sand colour (set by the background)

    def horizon_at(self, x: float) -> float:
        return self.horizon + self.slope * (x - self.width / 2)

    def tex(self, kind: str, box: tuple[int, int, int, int]) -> np.ndarray:
        """A crop of a bank texture covering `box`, at a random offset (so objects differ)."""
        x0, y0, x1, y1 = box
        oy, ox = self.rng.integers(0, BANK_MARGIN, size=2)
        return self.bank[kind][oy + y0:oy + y1, ox + x0:ox + x1]

    def pick(self, key: str, jitter: float = 0.06) -> np.ndarray:
        """One palette mode of this domain, jittered per object in brightness and hue."""
        modes = self.dom[key]
        colour = modes[self.rng.integers(len(modes))]
        return (colour * self.rng.uniform(1 - jitter, 1 + jitter) * self.rng.uniform(0.96, 1.04, 3)).astype(np.float32)

    def fog(self, colour: np.ndarray, depth: float) -> np.ndarray:
        """Aerial perspective: far things (depth near 0) fade towards the haze colour."""
        f = self.haze * np.exp(-depth / 0.12)
        return (colour * (1 - f) + self.haze_colour * f).astype(np.float32)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int] | None:
        b = (max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0), min(int(np.ceil(x1)), self.width), min(int(np.ceil(y1)), self.height))
        return b if b[2] > b[0] and b[3] > b[1] else None

    def paint(self, box, mask: np.ndarray, rgb: np.ndarray, cls: int | None) -> None:
        """Write rgb (box-sized, or one colour) and the class where mask is set; cls None: image only."""
        x0, y0, x1, y1 = box
        region = self.img[y0:y1, x0:x1]
        region[mask] = rgb[mask] if rgb.ndim == 3 else rgb
        if cls is not None:
            self.lab[y0:y1, x0:x1][mask] = cls

    def grid(self, box) -> tuple[np.ndarray, np.ndarray]:
        x0, y0, x1, y1 = box
        return (np.arange(x0, x1, dtype=np.float32)[None, :], np.arange(y0, y1, dtype=np.float32)[:, None])


def polygon_mask(box, points, width: int = 0) -> np.ndarray:
    """Rasterise a polygon (or, with width, a polyline) given in frame coordinates into the box."""
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    pts = [(float(px - x0), float(py - y0)) for px, py in points]
    if width:
        draw.line(pts, fill=255, width=width, joint="curve")
    else:
        draw.polygon(pts, fill=255)
    return np.asarray(canvas) > 0


def ground_shadow(sc: Scene, x: float, y: float, half_width: float, height: float, depth: float) -> None:
    """A soft-edged dark ellipse on the ground, away from the sun, sized by the caster's height."""
    length = max(half_width, height * sc.shadow_len)
    cx = x - sc.sun_side * length * 0.6
    rx, ry = half_width * 0.5 + length * 0.6, max(half_width * (0.12 + 0.3 * depth), 1.5)
    box = sc.box(cx - rx, y - ry, cx + rx, y + ry)
    if box is None:
        return
    gx, gy = sc.grid(box)
    r2 = ((gx - cx) / rx) ** 2 + ((gy - y) / ry) ** 2
    mask = r2 < 1
    if mask.any():
        x0, y0, x1, y1 = box
        factor = 1 - 0.42 * np.clip((1 - r2) * 2.5, 0, 1)
        sc.img[y0:y1, x0:x1][mask] *= factor[mask][:, None]
