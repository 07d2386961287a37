"""The torch dataset over (image, mask) pairs, and the decode cache on disk that feeds it.

    train = SegmentationDataset(pairs, transform, cache_size=(270, 480), cache_dir=cache_folder(run_dir))
    image, mask = train[0]          # transform(image uint8 (270, 480, 3), mask uint8 (270, 480))

`SegmentationDataset` decodes each pair once (`decode_pair`: read, check, resize to
`cache_size`) and runs its transform (augmentation or plain normalisation) on every
access. Without `cache_dir` the decoded pairs are kept in a dict in memory; with it
they come from a `DecodeCache`: every pair decoded and resized once, into
memory-mapped arrays.

    cache = DecodeCache.build_or_open(pairs, size=(270, 480), folder=data_root / ".cache")
    image, mask = cache.load(0)   # read-only views: uint8 (270, 480, 3) and (270, 480)

Why the disk cache: decoding the PNGs (a 960x540 image and its 16-bit mask) is most
of the cost of loading a sample, and the in-memory dict pays it again in every
DataLoader worker (each fills a private copy) and in every run. Memory-mapped
arrays are decoded once, shared by all workers through the OS page cache, and
reused by later notebooks and runs.

Files in `folder`, named by a hash of the size and the pair list, so caches
of several splits or sizes sit side by side:

    decode-<hash>.images.npy   uint8 (N, H, W, 3)
    decode-<hash>.masks.npy    uint8 (N, H, W): class indices, 255 = ignore (all 255 for a pair without mask)
    decode-<hash>.json         the index: format version, size, pairs, each file's byte size and mtime_ns
    decode-<hash>.lock         held (`filelock`) while a process builds the cache

A cache is used only when its index matches the current files exactly and
both arrays have the expected shape and file length; otherwise it is rebuilt.
So a replaced or touched file, a changed size, an added or removed pair
(which also changes the hash), a deleted index or a truncated array all lead
to a rebuild, never to reading stale or partial data. Building deletes the old
index first, writes the arrays to temporary files renamed into place, and
writes the index last (atomically): a crash at any point leaves no cache that
passes the check. Caches of other pair lists are left alone: delete the folder
to reclaim their space.

Several processes (the ranks of a DDP run, two notebooks) asking for the same
cache at once: a build holds an exclusive lock on `decode-<hash>.lock`
(`filelock`: flock on Unix, msvcrt on Windows, released by the OS even if the
process dies), and a process
that waited for it checks again and opens what the other built. So the pairs
are decoded once, and no process replaces files another has mapped.

Where: `cache_folder(run_dir)` is the one rule, `$OFFROADSEG_CACHE` when set
(e.g. local scratch on Kaggle, whose /kaggle/working holds 20 GB), else the run
folder's `cache/`. Free space for the whole build is checked before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .classes import IGNORE_INDEX
from .data import DataError, read_image, read_mask
from .files import atomic_open, read_json, write_json
from .preprocess import resize_pair

# 2: images resized by `preprocess.resize_pair` (antialiased bilinear, as predict; 1 was PIL's box filter).
FORMAT_VERSION = 2
# The folder for decode caches when set (see `cache_folder`); resolved from the working directory.
CACHE_ENV = "OFFROADSEG_CACHE"
# Pairs below this count decode in-process: starting worker processes would cost more than it saves.
PARALLEL_MIN_PAIRS = 32


def decode_pair(image_path, mask_path, size: tuple[int, int] | None):
    """One pair decoded and resized to `size` (height, width; None keeps it): (image uint8 HxWx3, mask uint8 HxW).

    The resize is `preprocess.resize_pair`, the rule of every model input: cached val images
    are the pixels predict computes from the same frame.

    A pair without a mask gets an all-ignore mask; a mask whose size differs from
    its image's is a DataError (resizing one to the other would misplace labels).
    """
    image = read_image(image_path)
    if mask_path is None:
        mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    else:
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: size {mask.shape[1]}x{mask.shape[0]} differs from image "
                            f"{image.shape[1]}x{image.shape[0]} (the scan skips such pairs; rerun notebook 01)")
    return resize_pair(image, mask, size)


class SegmentationDataset:
    """A torch-style dataset over (image, mask) pairs, decoding each file once.

    Images are decoded and resized to `cache_size` (height, width; None keeps each
    pair's own size) on first use and kept in memory as uint8, so later epochs skip
    PNG decoding; `transform(image, mask)` (augmentation or plain normalisation)
    runs on every access. Pairs without a mask yield an all-ignore mask.

    With `cache_dir` the pairs are instead decoded up front into a memory-mapped
    `DecodeCache` in that folder (reused across runs, rebuilt when a file
    changes): DataLoader workers share it through the OS page cache instead of
    each filling a private dict. `load` then returns read-only views.
    """

    def __init__(self, pairs, transform=None, cache_size: tuple[int, int] | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.pairs = [(Path(image), None if mask is None else Path(mask)) for image, mask in pairs]
        self.transform = transform
        self.cache_size = cache_size
        self._cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.store = None
        if cache_dir is not None:
            if cache_size is None:
                raise ValueError("cache_dir needs a cache_size: one memory-mapped array holds images of one size")
            self.store = DecodeCache.build_or_open(self.pairs, cache_size, cache_dir)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The (image uint8 HxWx3, mask uint8 HxW) pair at `cache_size`, from the cache when present."""
        if self.store is not None:
            return self.store.load(index)
        if index not in self._cached:
            self._cached[index] = decode_pair(*self.pairs[index], self.cache_size)
        return self._cached[index]

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask)

    def stem(self, index: int) -> str:
        return self.pairs[index][0].stem


def eval_loader(dataset, batch_size: int = 8, workers: int = 0) -> DataLoader:
    """The evaluation DataLoader: fixed order, no drop, every sample once (the training loaders are
    `sampling`'s). What scoring, calibration and BatchNorm re-estimation read through."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def cache_folder(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its decode caches: `$OFFROADSEG_CACHE` when set, else `run_dir`/cache.

    The caches are named by the pairs and size they hold, so one folder serves several runs.
    A relative $OFFROADSEG_CACHE resolves from the working directory (run_all.sh: the project root).
    """
    chosen = os.environ.get(CACHE_ENV, "").strip()
    return Path(chosen).expanduser().resolve() if chosen else Path(run_dir) / "cache"


class DecodeCache:
    """Read access to a built cache; make one with `build_or_open`.

    The arrays are opened lazily in each process and left out when pickled, so
    a dataset holding a cache travels to DataLoader workers (fork or spawn)
    without copying gigabytes through a pipe.
    """

    def __init__(self, stem: Path, length: int, size: tuple[int, int]):
        self.stem = stem
        self.length = length
        self.size = size
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    @property
    def images_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".images.npy")

    @property
    def masks_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".masks.npy")

    @property
    def index_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def lock_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".lock")

    @classmethod
    def build_or_open(cls, pairs, size: tuple[int, int], folder: str | os.PathLike,
                      workers: int | None = None, progress: bool = True) -> DecodeCache:
        """The cache of `pairs` ((image, mask or None) paths) at `size` (height, width) in `folder`.

        Opens the existing cache when it matches the files; otherwise decodes
        every pair (with `workers` processes, default all cores) and builds it.
        A pair that cannot be decoded is a `data.DataError` naming the file.
        """
        pairs = [(Path(image), None if mask is None else Path(mask)) for image, mask in pairs]
        size = (int(size[0]), int(size[1]))
        listed = [[str(image), None if mask is None else str(mask)] for image, mask in pairs]
        key = hashlib.sha1(json.dumps({"size": size, "pairs": listed}).encode()).hexdigest()[:16]
        index = {"version": FORMAT_VERSION, "size": list(size), "pairs": listed,
                 "files": [[_fingerprint(image), None if mask is None else _fingerprint(mask)] for image, mask in pairs]}
        cache = cls(Path(folder) / f"decode-{key}", len(pairs), size)
        if cache._matches(index):
            return cache
        with _exclusive(cache.lock_path, progress):
            if not cache._matches(index):  # another process may have built it while this one waited
                cache._build(pairs, index, workers, progress)
        return cache

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3), mask uint8 (H, W)) of pair `index`: read-only views into the files, no copy."""
        if self._images is None:
            self._open()
        return np.asarray(self._images[index]), np.asarray(self._masks[index])

    def __getstate__(self):
        return {**self.__dict__, "_images": None, "_masks": None}

    def _open(self) -> None:
        """Map both arrays read-only; ValueError (or OSError) when either is missing, truncated or mis-shaped."""
        shapes = {self.images_path: (self.length, *self.size, 3), self.masks_path: (self.length, *self.size)}
        arrays = []
        for path, shape in shapes.items():
            array = np.load(path, mmap_mode="r")
            if array.shape != shape or array.dtype != np.uint8:
                raise ValueError(f"{path}: holds {array.dtype} {array.shape}, expected uint8 {shape}")
            if path.stat().st_size != array.offset + array.nbytes:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {array.offset + array.nbytes}")
            arrays.append(array)
        self._images, self._masks = arrays

    def _matches(self, index: dict) -> bool:
        try:
            if read_json(self.index_path) != index:
                return False
            self._open()
        except (OSError, ValueError):
            return False
        return True

    def _build(self, pairs, index: dict, workers: int | None, progress: bool) -> None:
        height, width = self.size
        folder = self.stem.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._images = self._masks = None
        check_free_space(folder, len(pairs), self.size, replacing=(self.images_path, self.masks_path))
        # The old index goes first: from here until the new one is written, nothing passes `_matches`.
        # The stale arrays go too, so the new ones never need room beside them.
        self.index_path.unlink(missing_ok=True)
        self.images_path.unlink(missing_ok=True)
        self.masks_path.unlink(missing_ok=True)
        bar = tqdm(total=len(pairs), desc="decode cache", unit="pair", disable=not progress)
        try:
            # closing(): on a failure the worker pool shuts down now, not when the traceback is freed.
            with atomic_open(self.images_path, "wb") as images, atomic_open(self.masks_path, "wb") as masks, \
                    contextlib.closing(_decode_all(pairs, self.size, workers)) as decoded:
                _write_header(images, (len(pairs), height, width, 3))
                _write_header(masks, (len(pairs), height, width))
                for image, mask in decoded:
                    images.write(np.ascontiguousarray(image, dtype=np.uint8).data)
                    masks.write(np.ascontiguousarray(mask, dtype=np.uint8).data)
                    bar.update()
        finally:
            bar.close()
        write_json(self.index_path, index)
        self._open()


def cache_bytes(count: int, size: tuple[int, int]) -> int:
    """Bytes on disk of a cache of `count` pairs at `size`: RGB images and one-byte masks, plus headers."""
    return count * size[0] * size[1] * 4 + 2 * 128


def check_free_space(folder: Path, count: int, size: tuple[int, int], replacing=()) -> None:
    """OSError, before any work, when `folder` lacks room for the whole cache (`replacing`: files it deletes first)."""
    needed = cache_bytes(count, size)
    free = shutil.disk_usage(folder).free + sum(path.stat().st_size for path in map(Path, replacing) if path.exists())
    if needed > free:
        raise OSError(
            f"{folder}: the decode cache of {count} pairs at {size[0]}x{size[1]} needs {needed / 1e9:.2f} GB, and only "
            f"{free / 1e9:.2f} GB are free there. Put the cache on a disk with room: set {CACHE_ENV}=/path/to/scratch "
            f"(e.g. local scratch such as /tmp on Kaggle, rather than /kaggle/working), or free space, "
            f"or use a smaller image_size."
        )


@contextlib.contextmanager
def _exclusive(path: Path, progress: bool):
    """Hold an exclusive lock on `path` (created if missing) against every other process.

    An OS lock (`filelock.FileLock`) rather than a "lock file exists" test: the OS drops the lock
    when its holder dies, so a killed build never leaves the cache locked (whether the empty file
    stays is filelock's choice; where flock is missing its soft lock reclaims a dead holder's file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"waiting for another process building the decode cache {path.with_suffix('')} ...", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fingerprint(path: Path) -> list[int]:
    """[size in bytes, mtime in ns]: changes whenever the file is rewritten, without reading it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    return [stat.st_size, stat.st_mtime_ns]


def _write_header(handle, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})


def _decode_all(pairs, size: tuple[int, int], workers: int | None):
    """Decoded, resized pairs in order. With several workers at most a few decoded pairs per
    worker wait to be written, so memory stays bounded however many pairs there are."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(pairs) < PARALLEL_MIN_PAIRS:
        for image, mask in pairs:
            yield decode_pair(image, mask, size)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
        pending = deque()
        for image, mask in pairs:
            pending.append(pool.submit(decode_pair, image, mask, size))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _one_thread() -> None:
    """Each decode worker resizes with one torch thread: the workers already fill the cores, and
    each with torch's default of a thread per core would oversubscribe them."""
    torch.set_num_threads(1)
