"""The class table (offroadseg.classes): raw mask IDs to train indices and back, unknown IDs, colours."""

import numpy as np
import pytest

from offroadseg.classes import (
    CLASS_NAMES,
    COLORS,
    IGNORE_INDEX,
    INDEX_TO_RAW,
    NUM_CLASSES,
    PALETTE,
    RAW_IDS,
    RAW_TO_INDEX,
)


def test_the_tables_describe_the_same_ten_classes():
    assert NUM_CLASSES == 10 == len(CLASS_NAMES) == len(RAW_IDS) == len(COLORS)
    assert len(set(CLASS_NAMES)) == len(set(RAW_IDS)) == NUM_CLASSES
    # Flowers (600) is a class and 0 is none: the starter code's two mistakes on this data.
    assert RAW_IDS[CLASS_NAMES.index("Flowers")] == 600 and 0 not in RAW_IDS
    assert max(RAW_IDS) == 10000 < 2**16  # masks are 16-bit PNGs
    # The ignore label is no class and fits the uint8 class maps.
    assert NUM_CLASSES <= IGNORE_INDEX < 256


def test_raw_ids_map_to_their_index_and_back():
    indices = RAW_TO_INDEX[np.array(RAW_IDS)]
    assert indices.tolist() == list(range(NUM_CLASSES))
    assert INDEX_TO_RAW[indices].tolist() == list(RAW_IDS)
    # A mask in the files' own dtype maps as a whole, and maps back unchanged.
    mask = np.array([[100, 10000, 600], [7100, 550, 200]], dtype=np.uint16)
    classes = RAW_TO_INDEX[mask]
    assert classes.dtype == np.uint8 and classes.tolist() == [[0, 9, 5], [8, 4, 1]]
    assert INDEX_TO_RAW[classes].dtype == np.uint16 and (INDEX_TO_RAW[classes] == mask).all()


@pytest.mark.parametrize("raw", [0, 1, 99, 101, 400, 7000, 9999, 10001, 65535])
def test_unknown_raw_ids_are_ignored_never_folded_into_a_class(raw):
    assert RAW_TO_INDEX[raw] == IGNORE_INDEX


def test_only_the_ten_raw_ids_are_classes():
    assert RAW_TO_INDEX.shape == (65536,)  # every 16-bit value has an entry
    known = np.flatnonzero(RAW_TO_INDEX != IGNORE_INDEX)
    assert known.tolist() == sorted(RAW_IDS)


def test_palette_colours_each_class_and_draws_ignore_black():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8  # indexable by any uint8 label
    assert PALETTE[:NUM_CLASSES].tolist() == [list(c) for c in COLORS]
    assert PALETTE[IGNORE_INDEX].tolist() == [0, 0, 0]
    labels = np.array([[0, 9], [IGNORE_INDEX, 5]], dtype=np.uint8)
    assert PALETTE[labels].shape == (2, 2, 3) and PALETTE[labels][0, 1].tolist() == list(COLORS[9])


def test_class_colours_are_tellable_apart_and_from_ignore():
    colours = np.array(COLORS, dtype=float)
    assert all(0 <= v <= 255 for c in COLORS for v in c)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    nearest = distances[~np.eye(NUM_CLASSES, dtype=bool)].min()
    assert nearest > 40  # no two classes share a colour in an overlay (closest pair: about 46 apart)
    assert np.linalg.norm(colours, axis=1).min() > 100  # no class looks like black, the ignore colour
