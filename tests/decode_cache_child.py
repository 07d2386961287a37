"""Child process of test_dataset.py: build (or open) one decode cache, logging each decode.

Imported by a `multiprocessing` "spawn" child, so it stays light (no torch).
"""

import os
import time

import numpy as np

from offroadseg import dataset
from offroadseg.dataset import DecodeCache


def build(pairs, folder, size, barrier, log, result):
    real = dataset.decode_pair

    def slow_logged_decode(image, mask, size):
        with open(log, "a") as handle:  # one line per decode, from either process
            handle.write(f"{os.getpid()} {image}\n")
        time.sleep(0.2)  # a build long enough for the other process to arrive while it runs
        return real(image, mask, size)

    dataset.decode_pair = slow_logged_decode
    barrier.wait()  # both processes ask for the cache at the same moment
    cache = DecodeCache.build_or_open(pairs, size, folder, workers=1, progress=False)
    loaded = [cache.load(i) for i in range(len(cache))]
    images = np.stack([image for image, _ in loaded])
    masks = np.stack([mask for _, mask in loaded])
    np.savez(result, images=images, masks=masks)
