"""Child process of test_runner.py: the run lock where `fcntl` does not exist (as on Windows).

    python no_fcntl_child.py hold FOLDER   # take outputs/<run>/lock, print "locked", sleep
    python no_fcntl_child.py try FOLDER    # try it and print the outcome; once more after a line on stdin;
                                           # then build a decode cache (its lock is the other user of filelock)

`fcntl` is made unimportable before anything else is imported, so offroadseg and filelock see
what they would see on Windows: filelock falls back to its soft lock here (Windows has its own
OS lock, msvcrt), and offroadseg must import and lock all the same.
"""

import sys

sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

warnings.simplefilter("ignore")  # filelock's notice that only its soft lock is available here

from offroadseg.chapters.context import RunMismatch  # noqa: E402
from offroadseg.runs import RunLock  # noqa: E402


def attempt(folder: Path) -> None:
    try:
        with RunLock(folder):
            print("acquired", flush=True)
    except RunMismatch as err:
        print(f"refused: {err}", flush=True)


if __name__ == "__main__":
    role, folder = sys.argv[1], Path(sys.argv[2])
    if role == "hold":
        lock = RunLock(folder).__enter__()
        print("locked", flush=True)
        time.sleep(60)
    else:
        import filelock
        from helpers import make_small_dataset

        from offroadseg.data import find_dataset
        from offroadseg.dataset import DecodeCache

        print(f"fcntl importable: {filelock.has_fcntl}", flush=True)
        attempt(folder)
        sys.stdin.readline()
        attempt(folder)
        pairs = find_dataset(make_small_dataset(folder.parent / "data", 2, 0, 0)).train
        cache = DecodeCache.build_or_open(pairs, (6, 10), folder.parent / "cache", workers=1, progress=False)
        print(f"decode cache of {len(cache)} pairs: {cache.load(0)[0].shape}", flush=True)
