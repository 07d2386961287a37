"""One desert scene and its labels: `render_scene(rng, size, domain)`.

The background (sky, distant hills, rippled sand) goes first, then the objects of `objects.OBJECTS`
scattered on the ground plane and drawn far to near, then the global light (exposure, sun tint,
vignette, sensor grain). `desert.make_desert` calls it once per image with that image's own
generator.

What the scenes are built to be, and why:
- All ten classes with the real imbalance: sky and landscape take well over half
  the pixels; logs and flowers appear in a minority of images and cover well under
  1% of the pixels; most objects are small and far away.
- Colour alone does not separate the classes (a nearest-class-mean-RGB classifier
  stays below 0.35 val mIoU): dry grass, dry bushes, ground clutter and sand share
  hues, rocks and logs share greys and browns, trees and lush bushes share greens,
  every class draws from a palette with several modes, and per-image sun
  brightness, tint and haze move every colour around.
- Texture, shape and context do separate them, at the 1/3 scale the demo trains
  on: dry grass is streaky vertical strokes with spiky tops, dry bushes are dark
  domes of branch tangles, ground clutter is speckled flat debris, rocks are faceted
  shaded polygons casting shadows, logs are elongated with bark stripes and a cut
  end, trees have a trunk and a leafy canopy rising above the horizon, lush bushes
  are round leafy green mounds, flowers are clusters of bright blobs on a small
  leafy base, the sky is a smooth gradient with clouds above a varying horizon,
  and the landscape is rippled sand with distant hazy hills.
- Occlusion and perspective: objects are drawn far to near, and nearer ones are
  larger and lower in the frame.
- `domain="novel"` shifts the sand and vegetation palettes, the sun (lower, warmer)
  and the terrain (higher, rougher horizon, mesas), like the challenge's test on
  an unseen desert (the palettes are in `domains`).
"""

from __future__ import annotations

import numpy as np

from .canvas import LAND, SKY, Scene, noise_bank
from .domains import DOMAINS
from .objects import OBJECTS

# ----------------------------------------------------------------------------------------------
# Background: sky, distant hills, sand
# ----------------------------------------------------------------------------------------------


def _draw_background(sc: Scene) -> np.ndarray:
    """Sky, hills and rippled sand over the whole frame; returns the land-top row per column."""
    rng, W, H = sc.rng, sc.width, sc.height
    dom = sc.dom
    xs = np.arange(W, dtype=np.float32)
    horizon = sc.horizon + sc.slope * (xs - W / 2)

    # Hills: a smooth 1-D profile above the horizon (sum of random octaves), mesas in some domains.
    hill_h = rng.uniform(*dom["hill_height"]) * H
    profile = np.zeros(W, np.float32)
    for octave, amp in ((4, 1.0), (9, 0.45), (23, 0.2), (60, 0.08)):
        knots = rng.uniform(0, 1, octave + 2)
        profile += amp * np.interp(xs, np.linspace(-W * 0.05, W * 1.05, octave + 2), knots).astype(np.float32)
    profile = (profile - profile.min()) / (np.ptp(profile) + 1e-6)
    if rng.random() < dom["mesas"]:
        # Flat tops with steep sides: clip the profile and sharpen it.
        profile = np.clip((profile - 0.35) * 3.0, 0, 1) ** 0.5
    top = horizon - hill_h * profile  # first land row per column

    ys = np.arange(H, dtype=np.float32)[:, None]
    sky_rows = int(np.clip(np.ceil(top.max()) + 1, 1, H))

    # Sky: gradient from zenith to a pale horizon, sun glow, clouds.
    zen, hor = sc.pick("sky_zenith", 0.05), sc.pick("sky_horizon", 0.04)
    t = np.clip(ys[:sky_rows] / np.maximum(horizon[None, :], 1.0), 0, 1) ** 0.8
    sky = zen + (hor - zen) * t[..., None]
    sun_x = W / 2 + sc.sun_side * W * rng.uniform(0.25, 0.7)
    d2 = ((xs[None, :] - sun_x) ** 2 + (ys[:sky_rows] - horizon.mean() * 0.3) ** 2) / (0.35 * W) ** 2
    sky += (np.exp(-d2) * rng.uniform(0.05, 0.2))[..., None] * np.asarray([1.0, 0.95, 0.8], np.float32)
    cover = rng.uniform(-0.4, 1.2)  # some skies clear, some cloudy
    if cover > 0:
        clouds = sc.tex("large", (0, 0, W, sky_rows))
        c = np.clip((clouds - (1.3 - 0.9 * cover)) * 1.6, 0, 1) * np.clip(1.2 - t, 0, 1)
        cloud_col = np.float32(rng.uniform(0.82, 0.98)) * (0.88 + 0.12 * np.clip(clouds, -1, 2)[..., None] / 2)
        sky = sky * (1 - c[..., None]) + cloud_col * c[..., None]
    sc.img[:sky_rows] = sky
    sc.lab[:sky_rows] = SKY

    # Hills: hazy, shaded by slope towards the sun, darker towards their foot.
    hills_col = sc.pick("hills", 0.05)
    hills_col = hills_col * 0.6 + hor * 0.4
    slope = np.gradient(profile) * W / 30
    lit = np.clip(1.0 + 0.25 * np.tanh(-slope * sc.sun_side * 3), 0.7, 1.3)
    hill_rows = slice(max(int(np.floor(top.min())), 0), int(np.clip(np.ceil(horizon.max()) + 2, 1, H)))
    yy = ys[hill_rows]
    in_hill = (yy >= top[None, :]) & (yy < horizon[None, :] + 1)
    depth_in = np.clip((yy - top[None, :]) / max(hill_h, 1.0), 0, 1)
    shade = lit[None, :] * (1.0 - 0.15 * depth_in) + 0.08 * sc.tex("mid", (0, hill_rows.start, W, hill_rows.start + len(yy)))
    hill_rgb = hills_col * shade[..., None]
    sc.img[hill_rows][in_hill] = hill_rgb[in_hill]
    sc.lab[hill_rows][in_hill] = LAND

    # Sand: perspective ripples, large dune shading, grain; fades into haze at the horizon.
    g0 = max(int(np.floor(horizon.min())), 0)
    gy = ys[g0:]
    dy = np.maximum(gy - horizon[None, :], 0.5)
    ground = dy > 0.5
    depth = H * 0.35 / dy  # ground distance in units of the camera height
    gx = (xs[None, :] - W / 2) / dy * 0.35  # lateral ground coordinate in the same units
    angle = rng.uniform(-0.6, 0.6)
    freq = rng.uniform(*dom["ripple"])
    warp = sc.tex("mid", (0, g0, W, H)) * 0.9
    phase = freq * (gx * np.sin(angle) + depth * np.cos(angle)) + warp
    fade = np.clip(dy / (0.12 * H), 0, 1)
    ripple = np.sin(phase) * 0.07 * fade
    dune = sc.tex("large", (0, g0, W, H)) * 0.06
    grain = sc.tex("grain", (0, g0, W, H)) * 0.035
    sand = sc.sand = sc.pick("sand", 0.05)
    shade = 1.0 + ripple + dune + grain
    rgb = sand * shade[..., None]
    # Darker patches of harder soil break up the sand.
    soil = np.clip((sc.tex("mid", (0, g0, W, H)) - 1.1) * 1.5, 0, 1)[..., None] * 0.12
    rgb *= 1 - soil
    f = (sc.haze * np.exp(-dy / (0.1 * H)))[..., None]
    rgb = rgb * (1 - f) + sc.haze_colour * f
    region = sc.img[g0:]
    region[ground] = rgb[ground]
    sc.lab[g0:][ground] = LAND
    return top


# ----------------------------------------------------------------------------------------------
# The scene: background, objects far to near, global light
# ----------------------------------------------------------------------------------------------


def render_scene(rng: np.random.Generator, size: tuple[int, int] = (960, 540), domain: str = "default", bank_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One desert scene: (RGB uint8 (H, W, 3), class indices uint8 (H, W)).

    Deterministic given the generator's state; the textures come from a noise bank
    seeded by `bank_seed` (make_desert passes its seed).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)}")
    width, height = size
    dom = DOMAINS[domain]
    u = height / 540.0
    el = np.deg2rad(rng.uniform(*dom["sun_elevation"]))
    side = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.0)
    light = np.asarray([side * np.cos(el), -np.sin(el) - 0.3], np.float32)
    light /= np.linalg.norm(light)
    horizon = rng.uniform(*dom["horizon"]) * height
    sc = Scene(
        img=np.zeros((height, width, 3), np.float32),
        lab=np.full((height, width), LAND, np.uint8),
        rng=rng,
        bank=noise_bank(bank_seed, width, height),
        dom=dom,
        width=width,
        height=height,
        u=u,
        horizon=horizon,
        slope=np.tan(np.deg2rad(rng.uniform(-3, 3))),
        unit=height * rng.uniform(0.3, 0.42),
        sun_side=float(np.sign(side)),
        light=light,
        shadow_len=float(np.clip(1 / np.tan(el), 0.3, 3.0)) * 0.5,
        haze_colour=np.asarray(dom["sky_horizon"][rng.integers(len(dom["sky_horizon"]))], np.float32),
        haze=rng.uniform(0.15, 0.6),
    )
    _draw_background(sc)

    # Scatter objects on the ground plane, then draw them far to near so near ones occlude.
    items = []
    for name, (presence, (lo, hi), power, draw) in OBJECTS.items():
        density = dom["density"].get(name, 1.0)
        if rng.random() >= min(presence * (0.7 + 0.3 * density), 0.97):
            continue
        count = int(round(rng.integers(lo, hi + 1) * density))
        for _ in range(max(count, 1)):
            depth = rng.uniform(0.02, 1.0) ** power
            if name in ("logs", "flowers"):
                depth = rng.uniform(0.25, 1.0)  # rare classes: never vanishing far away
            x = rng.uniform(-0.05, 1.05) * width
            items.append((depth, x, draw))
    items.sort(key=lambda item: item[0])
    for depth, x, draw in items:
        y = sc.horizon_at(x) + depth * (height - horizon) + 2 * u
        s = sc.unit * (y - sc.horizon_at(x)) / (height - horizon)
        if s < 4 * u:
            continue  # too small to see
        draw(sc, x, y, s, depth)

    # Global lighting: exposure, sun tint, a mild vignette and sensor grain.
    tint = np.asarray(dom["sun_tint"], np.float32) * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    gain = np.float32(rng.uniform(*dom["brightness"]))
    img = sc.img
    img *= gain * tint
    xs = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    ys = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    vignette = 1 - 0.25 * (xs * xs + ys * ys)
    grain = sc.tex("grain", (0, 0, width, height)) * 0.012
    img *= vignette[..., None]
    img += grain[..., None]
    rgb = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return rgb, sc.lab

