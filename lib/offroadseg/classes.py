"""The ten Falcon desert classes: names, raw mask IDs, display colours.

Masks store raw IDs (up to 10000, hence 16-bit PNGs). Training uses class
indices 0..9; every other raw value maps to IGNORE_INDEX and is counted, never
folded into a class (starter code that maps 0 to "Background" or forgets
Flowers (600) is wrong for this data).
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Trees",
    "Lush Bushes",
    "Dry Grass",
    "Dry Bushes",
    "Ground Clutter",
    "Flowers",
    "Logs",
    "Rocks",
    "Landscape",
    "Sky",
)
RAW_IDS: tuple[int, ...] = (100, 200, 300, 500, 550, 600, 700, 800, 7100, 10000)
# Display colours for overlays and legends (RGB); chosen to be tellable apart, not realistic.
COLORS: tuple[tuple[int, int, int], ...] = (
    (34, 139, 34),  # Trees: forest green
    (124, 252, 0),  # Lush Bushes: lawn green
    (210, 180, 140),  # Dry Grass: tan
    (139, 90, 43),  # Dry Bushes: brown
    (128, 128, 0),  # Ground Clutter: olive
    (255, 20, 147),  # Flowers: deep pink
    (101, 67, 33),  # Logs: dark brown
    (128, 128, 128),  # Rocks: grey
    (244, 164, 96),  # Landscape: sandy brown
    (135, 206, 235),  # Sky: sky blue
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255

# Raw ID -> class index for every 16-bit value; anything unlisted is IGNORE_INDEX.
RAW_TO_INDEX = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
RAW_TO_INDEX[list(RAW_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)

# Class index -> raw ID (for writing predictions in the masks' own format).
INDEX_TO_RAW = np.zeros(256, dtype=np.uint16)
INDEX_TO_RAW[:NUM_CLASSES] = RAW_IDS

# Class index -> colour, with ignore drawn black.
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[:NUM_CLASSES] = COLORS
