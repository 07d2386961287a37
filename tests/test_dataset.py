import json
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import assert_names, make_small_dataset, stripes_mask, write_pair

from offroadseg import dataset as dataset_module
from offroadseg.augment import to_tensors
from offroadseg.classes import IGNORE_INDEX
from offroadseg.data import DataError, find_dataset
from offroadseg.dataset import DecodeCache, SegmentationDataset, decode_pair

SIZE = (6, 10)


@pytest.fixture
def pairs(tmp_path):
    make_small_dataset(tmp_path / "data", 3, 0, 0)
    return find_dataset(tmp_path / "data").train


@pytest.fixture
def decodes(monkeypatch):
    """Counts the pairs decoded (the in-process path: fewer pairs than PARALLEL_MIN_PAIRS)."""
    calls = []
    real = dataset_module.decode_pair
    monkeypatch.setattr(dataset_module, "decode_pair", lambda *args: calls.append(args[0]) or real(*args))
    return calls


def build(pairs, folder, size=SIZE):
    return DecodeCache.build_or_open(pairs, size, folder, progress=False)


def assert_holds(cache, pairs, size=SIZE):
    assert len(cache) == len(pairs)
    for i, (image_path, mask_path) in enumerate(pairs):
        image, mask = cache.load(i)
        expected_image, expected_mask = decode_pair(image_path, mask_path, size)
        assert image.shape == (*size, 3) and image.dtype == np.uint8 and mask.shape == size
        assert np.array_equal(image, expected_image) and np.array_equal(mask, expected_mask)


def test_segmentation_dataset_caches_resized_pairs(tmp_path):
    make_small_dataset(tmp_path, 2, 0, 0)
    ds = SegmentationDataset(find_dataset(tmp_path).train, cache_size=(6, 10))
    image, mask = ds[0]
    assert image.shape == (6, 10, 3) and image.dtype == np.uint8 and mask.shape == (6, 10)
    # nearest resize keeps labels exact: the 10 stripes of 2 px become 10 stripes of 1 px
    assert mask[0].tolist() == list(range(10))
    # decoded once: deleting the files does not matter for a cached index
    for path in ds.pairs[0]:
        path.unlink()
    assert np.array_equal(ds[0][1], mask)
    calls = []
    ds.transform = lambda im, m: calls.append(1) or (im.mean(), m.max())
    assert ds[0][1] == 9 and calls == [1]


def test_segmentation_dataset_size_mismatch_and_missing_mask(tmp_path):
    image_path, mask_path = write_pair(tmp_path, "train", "bad", stripes_mask(12, 20), image_size=(30, 12))
    with pytest.raises(DataError, match="differs from image"):
        SegmentationDataset([(image_path, mask_path)])[0]
    image, mask = SegmentationDataset([(image_path, None)])[0]
    assert (mask == IGNORE_INDEX).all() and mask.shape == image.shape[:2]


def test_holds_the_decoded_pairs_as_read_only_views(pairs, tmp_path):
    pairs = pairs + [(pairs[0][0], None)]  # a pair without mask: all ignore
    cache = build(pairs, tmp_path / "cache")
    assert_holds(cache, pairs)
    assert (cache.load(3)[1] == 255).all()
    image, mask = cache.load(0)
    assert not image.flags.writeable and not mask.flags.writeable
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    stem = cache.stem.name
    # No temporary files left. The lock file of concurrent builds is filelock's: some releases leave it, empty.
    assert [n for n in names if n != f"{stem}.lock"] == [f"{stem}.images.npy", f"{stem}.json", f"{stem}.masks.npy"]
    index = json.loads(cache.index_path.read_text())
    assert index["version"] == dataset_module.FORMAT_VERSION and index["size"] == list(SIZE)
    assert index["pairs"][0] == [str(pairs[0][0]), str(pairs[0][1])] and index["pairs"][3][1] is None
    stat = pairs[0][0].stat()
    assert index["files"][0][0] == [stat.st_size, stat.st_mtime_ns]


def test_second_open_does_not_decode(pairs, tmp_path, monkeypatch):
    build(pairs, tmp_path / "cache")

    def fail(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(dataset_module, "read_image", fail)
    monkeypatch.setattr(dataset_module, "read_mask", fail)
    again = build(pairs, tmp_path / "cache")
    image, _ = again.load(2)
    assert image.shape == (*SIZE, 3)


def test_changed_files_pairs_or_size_rebuild(pairs, tmp_path, decodes):
    folder = tmp_path / "cache"
    build(pairs, folder)
    assert len(decodes) == 3
    # New content in a file (a mask with other classes): rebuilt, and the new labels are there.
    write_pair(tmp_path / "data", "train", pairs[1][0].stem, stripes_mask(12, 20, classes=[9, 8]))
    cache = build(pairs, folder)
    assert len(decodes) == 6 and set(np.unique(cache.load(1)[1])) == {8, 9}
    assert_holds(cache, pairs)
    # Only the modification time changes (a file touched or copied over): rebuilt too.
    stat = pairs[2][1].stat()
    os.utime(pairs[2][1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    build(pairs, folder)
    assert len(decodes) == 9
    build(pairs, folder)
    assert len(decodes) == 9
    # Another pair list or size: a cache of its own beside the first.
    more = pairs + [write_pair(tmp_path / "data", "train", "extra")]
    assert_holds(build(more, folder), more)
    bigger = build(pairs, folder, size=(8, 12))
    assert_holds(bigger, pairs, size=(8, 12))
    assert len(list(folder.glob("*.json"))) == 3
    # A pair whose file has gone: a clear error naming it.
    pairs[0][0].unlink()
    with pytest.raises(DataError, match=f"{pairs[0][0].name}: file not found"):
        build(pairs, folder)


@pytest.mark.parametrize("damage", ["index deleted", "index garbled", "images truncated", "masks truncated",
                                    "masks deleted", "images padded"])
def test_damaged_cache_is_rebuilt_not_read(pairs, tmp_path, decodes, damage):
    cache = build(pairs, tmp_path / "cache")
    if damage == "index deleted":
        cache.index_path.unlink()
    elif damage == "index garbled":
        cache.index_path.write_text('{"version": 1, "size": [6, ')
    elif damage == "masks deleted":
        cache.masks_path.unlink()
    else:
        path = cache.images_path if damage.startswith("images") else cache.masks_path
        full = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(full + 100 if damage.endswith("padded") else full - 7)
    rebuilt = build(pairs, tmp_path / "cache")
    assert len(decodes) == 6
    assert_holds(rebuilt, pairs)


def test_a_failed_build_leaves_no_valid_looking_cache(pairs, tmp_path):
    folder = tmp_path / "cache"
    cache = build(pairs, folder)
    # The data changes and the rebuild fails half-way on an undecodable image.
    pairs[2][0].write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=pairs[2][0].name):
        build(pairs, folder)
    assert not cache.index_path.exists()  # the old index went first: the stale arrays cannot pass as current
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    write_pair(tmp_path / "data", "train", pairs[2][0].stem)
    assert_holds(build(pairs, folder), pairs)


def test_parallel_build_gives_the_same_arrays(pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "PARALLEL_MIN_PAIRS", 2)
    cache = DecodeCache.build_or_open(pairs, SIZE, tmp_path / "cache", workers=2, progress=False)
    assert_holds(cache, pairs)
    pairs[1][1].write_bytes(b"")
    with pytest.raises(DataError, match=f"{pairs[1][1].name}: empty file"):
        DecodeCache.build_or_open(pairs, (5, 5), tmp_path / "cache", workers=2, progress=False)


def test_pickles_without_its_arrays(pairs, tmp_path):
    cache = build(pairs, tmp_path / "cache")
    cache.load(0)  # mapped in this process
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._images is None  # reopened lazily where it is used
    assert np.array_equal(copy.load(1)[0], cache.load(1)[0])


def test_dataset_reads_through_the_cache_in_dataloader_workers(pairs, tmp_path):
    with pytest.raises(ValueError, match="cache_size"):
        SegmentationDataset(pairs, cache_dir=tmp_path / "cache")
    dataset = SegmentationDataset(pairs, to_tensors, cache_size=SIZE, cache_dir=tmp_path / "cache")
    assert dataset.store is not None and not dataset._cached
    assert len(pickle.dumps(dataset)) < 4000  # file names and sizes only, not the pixels
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    images, masks = zip(*loader)
    images, masks = torch.cat(images), torch.cat(masks)
    assert images.shape == (3, 3, *SIZE) and images.dtype == torch.uint8 and masks.shape == (3, *SIZE)
    for i, pair in enumerate(pairs):
        image, mask = decode_pair(*pair, SIZE)
        assert torch.equal(images[i], torch.from_numpy(np.array(image)).permute(2, 0, 1))
        assert torch.equal(masks[i], torch.from_numpy(np.array(mask)))


@pytest.mark.slow  # a few seconds alone: subprocesses (or a fit) each importing torch
def test_two_processes_building_the_same_cache_decode_once_and_both_read_it(pairs, tmp_path):
    # The two ranks of a DDP run both build the train set's cache as they start.
    import multiprocessing

    import decode_cache_child

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    log = tmp_path / "decodes.log"
    children = [context.Process(target=decode_cache_child.build,
                                args=(pairs, tmp_path / "cache", SIZE, barrier, log, tmp_path / f"rank{rank}.npz"))
                for rank in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    decoded = log.read_text().splitlines()
    assert len(decoded) == len(pairs), decoded  # once, by one process: not once per process
    assert len({line.split()[0] for line in decoded}) == 1
    expected = [decode_pair(image, mask, SIZE) for image, mask in pairs]
    for rank in range(2):
        result = np.load(tmp_path / f"rank{rank}.npz")
        assert np.array_equal(result["images"], np.stack([image for image, _ in expected]))
        assert np.array_equal(result["masks"], np.stack([mask for _, mask in expected]))
    assert_holds(build(pairs, tmp_path / "cache"), pairs)


def test_no_room_for_the_whole_cache_is_an_error_before_any_decode(pairs, tmp_path, decodes, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 100))
    folder = tmp_path / "cache"
    with pytest.raises(OSError) as error:
        build(pairs, folder)
    assert_names(error, folder, "3 pairs", "6x10", "OFFROADSEG_CACHE=")
    assert decodes == []


def test_the_stale_arrays_being_replaced_count_as_room(pairs, tmp_path, decodes, monkeypatch):
    import shutil
    from collections import namedtuple

    build(pairs, tmp_path / "cache")
    os.utime(pairs[1][0], ns=(1, 1))  # a changed file: the same cache is rebuilt in place
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    assert_holds(build(pairs, tmp_path / "cache"), pairs)  # the old arrays go first, so they make the room
    assert len(decodes) == 6


def test_cache_folder_is_the_run_folders_unless_the_environment_names_one(tmp_path, monkeypatch):
    monkeypatch.delenv(dataset_module.CACHE_ENV, raising=False)
    assert dataset_module.cache_folder(tmp_path / "run") == tmp_path / "run" / "cache"
    monkeypatch.setenv(dataset_module.CACHE_ENV, str(tmp_path / "scratch"))
    assert dataset_module.cache_folder(tmp_path / "run") == tmp_path / "scratch"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(dataset_module.CACHE_ENV, "relative")
    assert dataset_module.cache_folder("run") == tmp_path / "relative"
