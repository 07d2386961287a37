"""A procedural desert in Duality's Falcon layout, for demos and tests without the real data.

    make_desert(root, counts={"train": 240, "val": 40, "test": 30}, size=(960, 540), seed=0, domain="default")
    make_demo_desert(root)   # train/val in the "default" desert; test, adapt and novel_val in a "novel" one

A package rather than one module because it holds two concepts that change for different
reasons: the files a notebook asks for, and how one scene is painted. Where things live:

    desert.py    what callers use: make_desert, make_demo_desert, is_demo_desert, split_folder;
                 the Duality layout on disk, per-image seeding, the marker that makes it idempotent
    scene.py     render_scene: one image and its labels (background, objects far to near, light);
                 why the scenes look the way they do is in its docstring
    objects.py   one painter per object class (rocks, logs, trees, bushes, grass, clutter, flowers)
                 and the table of how often each appears
    canvas.py    what every painter draws with: the Scene state, the noise bank, shadows, polygons
    domains.py   the look of each desert ("default", "novel"): palettes, sun, terrain, densities

Imports run down that list (desert -> scene -> objects -> canvas; domains stands alone), never
up. Everything callers import lives here under its old name: `from offroadseg.synth import
make_desert` and `synth.DEMO_COUNTS` work as before.
"""

from .desert import (
    ADAPT_DIR,
    DEMO_COUNTS,
    DOMAIN_CODES,
    GENERATOR_VERSION,
    MARKER_NAME,
    NOVEL_SPLITS,
    SPLIT_CODES,
    TEST_DIR,
    TRAIN_DIR,
    UNLABELLED_SPLITS,
    is_demo_desert,
    make_demo_desert,
    make_desert,
    split_folder,
)
from .domains import DOMAINS
from .scene import render_scene

__all__ = [
    "ADAPT_DIR",
    "DEMO_COUNTS",
    "DOMAINS",
    "DOMAIN_CODES",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "NOVEL_SPLITS",
    "SPLIT_CODES",
    "TEST_DIR",
    "TRAIN_DIR",
    "UNLABELLED_SPLITS",
    "is_demo_desert",
    "make_demo_desert",
    "make_desert",
    "render_scene",
    "split_folder",
]
