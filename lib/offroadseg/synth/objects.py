"""One painter per object class, and how often each appears in an image (`OBJECTS`).

What makes each class recognisable by texture, shape and context rather than colour is in
`scene`'s docstring; each painter below draws one such object at a point on the ground.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .canvas import CLUTTER, DRYBUSH, FLOWERS, GRASS, LOGS, LUSH, ROCKS, TREES, Scene, ground_shadow, polygon_mask

# ----------------------------------------------------------------------------------------------
# Objects. Each takes the base point (x, y) on the ground, the perspective scale s (pixels per
# world unit there) and the depth (0 at the horizon, 1 at the bottom row).
# ----------------------------------------------------------------------------------------------


def _draw_rock(sc: Scene, x, y, s, depth):
    rng = sc.rng
    w = s * rng.uniform(0.3, 1.2)
    h = w * rng.uniform(0.45, 0.85)
    ground_shadow(sc, x, y, w / 2, h, depth)
    n = rng.integers(6, 11)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.7, 1.0, n)
    cy = y - h * 0.45
    px = x + np.cos(angles) * radii * w / 2
    py = np.minimum(cy + np.sin(angles) * radii * h / 2, y + h * 0.05)  # flat-ish bottom on the ground
    box = sc.box(px.min() - 1, py.min() - 1, px.max() + 2, py.max() + 2)
    if box is None:
        return
    mask = polygon_mask(box, list(zip(px, py)))
    if not mask.any():
        return
    # Facets: each pixel belongs to the sector between two vertices around an off-centre apex;
    # a facet's brightness follows how much its outward direction faces the sun.
    ax, ay = x + rng.uniform(-0.2, 0.2) * w, cy - rng.uniform(0.0, 0.3) * h
    gx, gy = sc.grid(box)
    theta = np.arctan2(gy - ay, gx - ax) % (2 * np.pi)
    facet = np.searchsorted(angles, theta) % n
    mids = angles + np.diff(np.append(angles, angles[0] + 2 * np.pi)) / 2
    normal = np.stack([np.cos(mids), np.sin(mids) - 0.8], axis=1)  # tilted up: rocks are convex on top
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    light = 0.38 + 0.75 * np.clip(normal @ sc.light, 0, 1) + rng.uniform(-0.05, 0.05, n)
    shade = light[facet] * (1 + 0.05 * sc.tex("speck", box) + 0.05 * sc.tex("mid", box))
    colour = sc.fog(sc.pick("rocks", 0.08), depth)
    sc.paint(box, mask, colour * shade[..., None], ROCKS)


def _draw_log(sc: Scene, x, y, s, depth):
    rng = sc.rng
    length = s * rng.uniform(2.0, 4.0)
    width = max(s * rng.uniform(0.14, 0.24), 4 * sc.u)
    alpha = rng.uniform(-0.45, 0.45)  # mostly lying across the view
    length *= 1 - 0.35 * abs(np.sin(alpha))
    cx, cy = x, y - width * 0.5
    ca, sa = np.cos(alpha), np.sin(alpha)
    ground_shadow(sc, x, y, length * 0.5, width, depth)
    ext = length / 2 + width
    box = sc.box(cx - ext, cy - ext * abs(sa) - width, cx + ext, cy + ext * abs(sa) + width)
    if box is None:
        return
    gx, gy = sc.grid(box)
    along = (gx - cx) * ca + (gy - cy) * sa
    across = -(gx - cx) * sa + (gy - cy) * ca
    half = width / 2
    body = (np.abs(along) <= length / 2) & (np.abs(across) <= half)
    cap = ((along - length / 2) / (half * 0.45)) ** 2 + (across / half) ** 2 <= 1  # the cut end
    stub = ((along + length / 2) / (half * 0.45)) ** 2 + (across / half) ** 2 <= 1
    mask = body | cap | stub
    if not mask.any():
        return
    t = np.clip(across / half, -1, 1)
    # Cylinder shading: top of the log (t < 0, towards image-up) lit, underside dark.
    light = 0.5 + 0.45 * np.clip(-t * 0.8 + 0.3 * sc.sun_side * ca, -1, 1)
    bark = 1 + 0.4 * np.sin(across / half * rng.uniform(2.5, 4.0) * np.pi + sc.tex("mid", box) * 0.6)
    knots = 1 - 0.25 * np.clip(sc.tex("speck", box) - 1.6, 0, 1)
    colour = sc.fog(sc.pick("logs", 0.08), depth)
    rgb = colour * (light * bark * knots)[..., None]
    # The cut end: pale wood with growth rings.
    r = np.sqrt(((along - length / 2) / (half * 0.45)) ** 2 + (across / half) ** 2)
    ring = 0.85 + 0.15 * np.sin(r * 14)
    wood = sc.fog(np.asarray([0.78, 0.64, 0.46], np.float32) * rng.uniform(0.8, 1.05), depth)
    end = cap & (along > length / 2)
    rgb[end] = wood * ring[end][:, None]
    # Broken-off branch stubs: a shape rocks never have.
    for _ in range(rng.integers(0, 3)):
        pos = rng.uniform(-0.35, 0.25) * length
        side = rng.choice([-1.0, 1.0])
        out = rng.uniform(0.6, 1.4) * width
        bx, by = cx + pos * ca - side * half * sa, cy + pos * sa + side * half * ca
        ang = alpha + side * np.pi / 2 + rng.uniform(-0.6, 0.6)
        stub_mask = polygon_mask(box, [(bx, by), (bx + np.cos(ang) * out, by + np.sin(ang) * out)], width=max(int(width * 0.35), 1))
        rgb[stub_mask & ~mask] = colour * 0.8
        mask = mask | stub_mask
    sc.paint(box, mask, rgb, LOGS)


def _draw_tree(sc: Scene, x, y, s, depth):
    rng = sc.rng
    height = s * rng.uniform(1.8, 3.6)
    trunk_h = height * rng.uniform(0.45, 0.65)
    trunk_w = max(s * rng.uniform(0.06, 0.12), 2 * sc.u)
    crown_w = height * rng.uniform(0.6, 1.1)
    crown_h = crown_w * rng.uniform(0.35, 0.6)
    lean = rng.uniform(-0.15, 0.15) * trunk_h
    ground_shadow(sc, x, y, crown_w * 0.35, height * 0.6, depth)
    ccx, ccy = x + lean, y - trunk_h - crown_h * 0.35
    box = sc.box(ccx - crown_w * 0.75, ccy - crown_h * 0.9, ccx + crown_w * 0.75, y + 2)
    if box is None:
        return
    x0, y0, _, _ = box
    # Trunk and a few branches into the crown.
    trunk = [(x - trunk_w / 2, y), (x + trunk_w / 2, y), (x + lean + trunk_w * 0.3, y - trunk_h), (x + lean - trunk_w * 0.3, y - trunk_h)]
    wood = polygon_mask(box, trunk)
    for _ in range(rng.integers(2, 5)):
        bx = x + lean * 0.7
        by = y - trunk_h * rng.uniform(0.6, 0.9)
        ex = ccx + rng.uniform(-0.4, 0.4) * crown_w
        ey = ccy + rng.uniform(-0.1, 0.3) * crown_h
        wood |= polygon_mask(box, [(bx, by), (ex, ey)], width=max(int(trunk_w * 0.45), 1))
    gx, gy = sc.grid(box)
    # Crown: a union of flattened ellipses, with a leafy, ragged edge.
    crown = np.full(wood.shape, -4.0, np.float32)
    for _ in range(rng.integers(5, 10)):
        ex = ccx + rng.normal(0, 0.25) * crown_w
        ey = ccy + rng.normal(0, 0.15) * crown_h
        rx = crown_w * rng.uniform(0.18, 0.35)
        ry = rx * rng.uniform(0.5, 0.8)
        crown = np.maximum(crown, 1 - ((gx - ex) / rx) ** 2 - ((gy - ey) / ry) ** 2)
    leaf = sc.tex("leaf", box)
    leafy = crown + 0.25 * leaf > 0.15
    trunk_rgb = sc.fog(sc.pick("trunk", 0.08), depth)
    bark = 1 + 0.15 * sc.tex("streak", box)
    sc.paint(box, wood & ~leafy, trunk_rgb * bark[..., None], TREES)
    colour = sc.fog(sc.pick("trees", 0.08), depth)
    # Leaves: lumpy, lit from the top and the sun side, dark gaps between leaf clusters.
    lit = 0.85 + 0.3 * np.clip((ccy - gy) / crown_h, -1, 1) + 0.15 * sc.sun_side * np.clip((gx - ccx) / crown_w, -1, 1)
    shade = lit * (1 + 0.35 * leaf) * (1 + 0.12 * sc.tex("mid", box))
    sc.paint(box, leafy, colour * np.clip(shade, 0.3, 1.6)[..., None], TREES)


def _draw_lush(sc: Scene, x, y, s, depth):
    rng = sc.rng
    w = s * rng.uniform(0.5, 1.4)
    h = w * rng.uniform(0.45, 0.75)
    ground_shadow(sc, x, y, w / 2, h, depth)
    box = sc.box(x - w * 0.7, y - h * 1.2, x + w * 0.7, y + 2)
    if box is None:
        return
    gx, gy = sc.grid(box)
    blob = np.full((box[3] - box[1], box[2] - box[0]), -4.0, np.float32)
    for _ in range(rng.integers(3, 7)):
        ex = x + rng.uniform(-0.3, 0.3) * w
        ey = y - h * rng.uniform(0.3, 0.6)
        r = w * rng.uniform(0.22, 0.35)
        blob = np.maximum(blob, 1 - ((gx - ex) ** 2 + ((gy - ey) / 0.85) ** 2) / r**2)
    leaf = sc.tex("leaf", box)
    mask = (blob + 0.2 * leaf > 0.12) & (gy <= y + 1)
    if not mask.any():
        return
    colour = sc.fog(sc.pick("lush", 0.08), depth)
    lit = 0.8 + 0.35 * np.clip(blob, 0, 1) + 0.12 * sc.sun_side * np.clip((gx - x) / w, -1, 1)
    shade = lit * (1 + 0.3 * leaf)
    sc.paint(box, mask, colour * np.clip(shade, 0.35, 1.6)[..., None], LUSH)


def _draw_grass(sc: Scene, x, y, s, depth):
    rng = sc.rng
    w = s * (rng.uniform(0.8, 3.0) if rng.random() < 0.7 else rng.uniform(3.0, 7.0))  # tufts, or a meadow
    h = s * rng.uniform(0.2, 0.5)
    box = sc.box(x - w / 2, y - h * 1.05, x + w / 2, y + h * 0.2 + 1)
    if box is None:
        return
    x0, y0, x1, y1 = box
    gx, gy = sc.grid(box)
    # Per column: a dome-shaped envelope times spiky blade tips.
    cols = gx[0]
    env = np.sqrt(np.clip(1 - ((cols - x) / (w / 2)) ** 2, 0, 1)) ** 0.6
    spacing = max(2.5 * sc.u, s * 0.015)
    n_knots = int((x1 - x0) / spacing) + 2
    knots = rng.uniform(0.0, 1.0, n_knots) ** 0.6
    knots[1::2] *= 0.45  # alternate tips and notches
    spikes = np.interp(cols, np.linspace(x0, x1, n_knots), knots)
    top = y - h * env * (0.35 + 0.65 * spikes)
    bottom = y + h * 0.15 * env * (0.6 + 0.4 * np.sin(cols / max(w, 1) * 9 + rng.uniform(0, 6)))
    mask = (gy >= top[None, :]) & (gy <= bottom[None, :]) & (env[None, :] > 0.05)
    if not mask.any():
        return
    colour = sc.fog(sc.pick("grass", 0.07), depth)
    up = np.clip((y - gy) / max(h, 1), 0, 1)  # 0 at the base, 1 at the tips
    shade = (0.72 + 0.35 * up) * (1 + 0.2 * sc.tex("streak", box))
    sc.paint(box, mask, colour * shade[..., None], GRASS)


def _draw_drybush(sc: Scene, x, y, s, depth):
    rng = sc.rng
    w = s * rng.uniform(0.5, 1.3)
    h = w * rng.uniform(0.5, 0.85)
    ground_shadow(sc, x, y, w / 2, h, depth)
    box = sc.box(x - w * 0.6, y - h * 1.1, x + w * 0.6, y + 2)
    if box is None:
        return
    gx, gy = sc.grid(box)
    # Dome with an irregular outline.
    ragged = 1 + 0.18 * sc.tex("mid", box)
    dome = ((gx - x) / (w / 2)) ** 2 + ((gy - y) / h) ** 2 < ragged
    dome &= gy <= y + 1
    if not dome.any():
        return
    # Branch tangle: curly twigs wandering in every direction (unlike grass blades, which all
    # stand up), pale over a dark interior: the shaded ground seen through the bush.
    lw = max(int(round(s * 0.022 + sc.u)), 1)
    canvas = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(14, 30)):
        px, py = x + rng.uniform(-0.4, 0.4) * w, y - rng.uniform(0.0, 0.8) * h
        ang = rng.uniform(0, 2 * np.pi)
        pts = [(px - box[0], py - box[1])]
        for _ in range(rng.integers(3, 6)):
            ang += rng.uniform(-1.2, 1.2)
            step = rng.uniform(0.08, 0.2) * w
            px, py = px + np.cos(ang) * step, py + np.sin(ang) * step
            pts.append((px - box[0], py - box[1]))
        draw.line(pts, fill=255, width=lw, joint="curve")
    gx, gy = sc.grid(box)
    reach = ((gx - x) / (w * 0.6)) ** 2 + ((gy - y) / (h * 1.15)) ** 2 < 1
    branches = (np.asarray(canvas) > 0) & reach & (gy <= y + 1)
    colour = sc.fog(sc.pick("drybush", 0.08), depth)
    # (From the sand colour, not the pixels behind: whatever stood there is hidden by the bush.)
    ground = sc.fog(sc.sand, depth)
    interior = (ground * 0.3 + colour * 0.25) * (1 + 0.15 * sc.tex("mid", box) + 0.05 * sc.tex("speck", box))[..., None]
    twigs = colour * (1.3 + 0.15 * sc.tex("leaf", box))[..., None]
    rgb = np.where(branches[..., None], twigs, interior)
    sc.paint(box, dome | branches, rgb.astype(np.float32), DRYBUSH)


def _draw_clutter(sc: Scene, x, y, s, depth):
    rng = sc.rng
    w = s * rng.uniform(1.0, 3.0)
    h = w * (0.12 + 0.25 * depth) * rng.uniform(0.8, 1.3)
    box = sc.box(x - w * 0.65, y - h * 0.65, x + w * 0.65, y + h * 0.65)
    if box is None:
        return
    gx, gy = sc.grid(box)
    r2 = ((gx - x) / (w / 2)) ** 2 + ((gy - y) / (h / 2)) ** 2
    mask = r2 < 1 + 0.35 * sc.tex("mid", box)
    if not mask.any():
        return
    # Debris: discrete pebbles (light, dark or reddish, flattened by perspective) and short
    # dark twigs on slightly darker soil. Drawn as an index map, coloured through a table.
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    colour = sc.fog(sc.pick("clutter", 0.08), depth)
    n = int(np.clip(w * h / max(s * 0.14, 4 * sc.u) ** 2 * 0.5, 4, 200))
    table = np.empty((n + 1, 3), np.float32)
    table[0] = 0
    flat = 0.35 + 0.4 * depth
    for k in range(1, n + 1):
        px, py = x + rng.uniform(-0.5, 0.5) * w, y + rng.uniform(-0.5, 0.5) * h
        if rng.random() < 0.25:  # a twig
            ang = rng.uniform(-0.6, 0.6)
            ln = s * rng.uniform(0.06, 0.18)
            draw.line([(px - x0, py - y0), (px - x0 + np.cos(ang) * ln, py - y0 + np.sin(ang) * ln * flat)],
                      fill=k, width=max(int(s * 0.025 + sc.u), 1))
            table[k] = colour * rng.uniform(0.35, 0.55)
        else:  # a pebble
            r = max(s * rng.uniform(0.035, 0.08), 2.5 * sc.u)
            draw.ellipse([px - x0 - r, py - y0 - r * flat, px - x0 + r, py - y0 + r * flat], fill=k)
            table[k] = colour * rng.choice([0.45, 1.35, 1.5]) * rng.uniform(0.9, 1.1, 3)
    index = np.asarray(canvas)
    soil = sc.fog(sc.sand, depth) * 0.55 + colour * 0.35
    rgb = soil * (1 + 0.12 * sc.tex("speck", box) + 0.06 * sc.tex("mid", box))[..., None]
    pieces = index > 0
    rgb[pieces] = table[index[pieces]]
    sc.paint(box, mask, rgb.astype(np.float32), CLUTTER)


def _draw_flowers(sc: Scene, x, y, s, depth):
    rng = sc.rng
    w = s * rng.uniform(0.5, 1.0)
    h = w * rng.uniform(0.3, 0.5)
    r_bloom = max(s * rng.uniform(0.06, 0.1), 4 * sc.u)
    box = sc.box(x - w * 0.65 - r_bloom, y - h * 1.3 - r_bloom, x + w * 0.65 + r_bloom, y + 2)
    if box is None:
        return
    gx, gy = sc.grid(box)
    # A low leafy base...
    base = ((gx - x) / (w / 2)) ** 2 + ((gy - y) / h) ** 2 < 1 + 0.4 * sc.tex("leaf", box)
    base &= gy <= y + 1
    leaves = sc.fog(sc.pick("lush", 0.1) * 0.8, depth)
    sc.paint(box, base, leaves * (1 + 0.3 * sc.tex("leaf", box))[..., None], FLOWERS)
    # ...carrying a cluster of bright blossoms with darker centres.
    bloom = sc.fog(sc.pick("flowers", 0.05), depth)
    petals = np.zeros(base.shape, bool)
    hearts = np.zeros(base.shape, bool)
    for _ in range(rng.integers(10, 26)):
        bx = x + rng.normal(0, 0.22) * w
        by = y - h * rng.uniform(0.2, 1.3)
        r = r_bloom * rng.uniform(0.7, 1.2)
        d2 = (gx - bx) ** 2 + (gy - by) ** 2
        petals |= d2 < r**2
        hearts |= d2 < (r * 0.35) ** 2
    rgb = np.broadcast_to(bloom, base.shape + (3,)).copy()
    rgb[hearts] = bloom * 0.45
    sc.paint(box, petals, rgb, FLOWERS)


# Per class: presence probability per image, (min, max) count when present, depth exponent
# (larger: more objects far away), drawing function.
OBJECTS = {
    "rocks": (0.85, (3, 14), 1.0, _draw_rock),
    "grass": (0.9, (6, 22), 1.0, _draw_grass),
    "drybush": (0.75, (2, 9), 1.1, _draw_drybush),
    "clutter": (0.7, (2, 8), 1.0, _draw_clutter),
    "lush": (0.55, (1, 7), 1.2, _draw_lush),
    "trees": (0.55, (1, 5), 2.0, _draw_tree),
    "flowers": (0.3, (1, 4), 1.2, _draw_flowers),
    "logs": (0.3, (1, 3), 1.2, _draw_log),
}
