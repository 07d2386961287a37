"""The look of each desert: palettes, sun, terrain and object densities, per domain.

`domain="default"` is the desert the demo trains on; `domain="novel"` shifts the sand and
vegetation palettes, the sun (lower, warmer) and the terrain (higher, rougher horizon, mesas),
like the challenge's test on an unseen desert (notebook 05 adapts to it). A domain is one dict
here plus a seed code in `desert.DOMAIN_CODES`; the painters read nothing else about it.

Palettes are lists of modes; each object picks one and jitters it (`canvas.Scene.pick`). The
modes deliberately overlap across classes, so that colour alone does not separate them (see
`scene`'s docstring).
"""

from __future__ import annotations

import numpy as np


def _rgb(*colours: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(colours, dtype=np.float32) / 255.0


# Per-domain look. Palettes are lists of modes; each object picks one and jitters it.
# The modes deliberately overlap across classes (see the module docstring).
DOMAINS: dict[str, dict] = {
    "default": {
        "sand": _rgb((206, 176, 130), (196, 162, 116), (214, 190, 150), (186, 150, 108)),
        "sky_zenith": _rgb((88, 138, 200), (120, 160, 208), (150, 164, 180), (104, 150, 196)),
        "sky_horizon": _rgb((200, 214, 226), (222, 212, 190), (206, 200, 196), (190, 206, 222)),
        "hills": _rgb((150, 140, 150), (170, 150, 130), (140, 144, 160)),
        "grass": _rgb((200, 176, 118), (178, 150, 96), (214, 196, 146), (160, 136, 92)),
        "drybush": _rgb((136, 122, 106), (156, 142, 124), (126, 118, 110)),
        "clutter": _rgb((150, 124, 92), (176, 150, 116), (130, 112, 94)),
        "rocks": _rgb((150, 146, 140), (166, 118, 92), (178, 166, 148), (120, 116, 114)),
        "logs": _rgb((100, 74, 54), (140, 124, 104), (126, 90, 64)),
        "trunk": _rgb((96, 80, 64), (120, 108, 96)),
        "trees": _rgb((86, 104, 58), (104, 122, 94), (60, 80, 44)),
        "lush": _rgb((80, 140, 56), (104, 150, 64), (70, 116, 58)),
        "flowers": _rgb((244, 214, 60), (226, 80, 160), (244, 242, 232), (156, 100, 214), (240, 140, 40)),
        "sun_elevation": (25.0, 65.0),  # degrees
        "sun_tint": (1.0, 0.97, 0.92),
        "brightness": (0.72, 1.22),
        "horizon": (0.34, 0.52),  # horizon row as a fraction of the height
        "hill_height": (0.02, 0.10),  # fraction of the height
        "mesas": 0.0,  # chance of flat-topped mesas on the horizon
        "ripple": (5.0, 9.0),  # dune ripple spatial frequency (ground units)
        "density": {"trees": 1.0, "lush": 1.0, "grass": 1.0, "drybush": 1.0, "clutter": 1.0, "rocks": 1.0},
    },
    "novel": {
        # A red, late-afternoon desert with mesas: same classes, shifted look.
        "sand": _rgb((206, 146, 100), (190, 128, 86), (216, 160, 114), (178, 120, 82)),
        "sky_zenith": _rgb((100, 138, 188), (132, 150, 178), (90, 128, 184)),
        "sky_horizon": _rgb((228, 206, 182), (216, 210, 200), (234, 198, 168)),
        "hills": _rgb((160, 104, 88), (140, 110, 110), (176, 120, 96)),
        "grass": _rgb((214, 170, 104), (190, 142, 84), (222, 190, 130)),
        "drybush": _rgb((112, 82, 64), (140, 104, 80), (120, 104, 96)),
        "clutter": _rgb((150, 102, 74), (170, 126, 96), (124, 92, 76)),
        "rocks": _rgb((150, 92, 70), (120, 84, 72), (176, 126, 96), (134, 124, 118)),
        "logs": _rgb((96, 66, 48), (150, 132, 116), (122, 84, 60)),
        "trunk": _rgb((100, 76, 60), (116, 100, 90)),
        "trees": _rgb((96, 108, 60), (88, 104, 76), (108, 114, 64)),
        "lush": _rgb((100, 146, 52), (86, 134, 60), (118, 150, 66)),
        "flowers": _rgb((250, 200, 40), (200, 60, 200), (250, 250, 240), (250, 110, 90)),
        "sun_elevation": (10.0, 32.0),
        "sun_tint": (1.0, 0.90, 0.78),
        "brightness": (0.70, 1.10),
        "horizon": (0.30, 0.50),
        "hill_height": (0.05, 0.16),
        "mesas": 0.6,
        "ripple": (8.0, 14.0),
        "density": {"trees": 0.6, "lush": 0.8, "grass": 0.9, "drybush": 1.2, "clutter": 1.1, "rocks": 1.5},
    },
}
