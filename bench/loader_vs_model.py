"""Data loader images/s against model training images/s, per model: is the accelerator starved?

(a) The loader, built exactly as training builds it now:
    - the train set from `assembly.datasets(scan, image_size, cache_dir=..., on_device=...)`:
      every train image decoded and resized to 1.5x the model input once, into the memory-mapped
      `DecodeCache` (shared by every DataLoader worker through the OS page cache). Each
      measurement builds it cold into a fresh temporary folder: `cache_build_s` (the whole
      `datasets` call, almost all of it decoding) and `decode_ips` (train + val images /
      cache_build_s: `datasets` caches both).
      Training pays this once per run folder (`<run>/cache`) and reuses it afterwards.
    - the DataLoader as `engine.fit` builds it (`sampling.make_loaders`): the weighted
      `EpochSampler` with the scan's sample weights, each sample seeded, drop_last, the workers
      `sampling.loader_workers` gives for `--workers` (persistent: started in epoch 1, kept for
      epoch 2), pin_memory on CUDA, wrapped by accelerate's `prepare` (which copies each batch
      to the device).
    - the augmentation where training puts it: on CUDA the dataset yields uint8 tensors at the
      cache size (`augment.to_tensors`) and `assembly.batch_augmentation` (`BatchAugment`:
      crop, resize, rotate, flip, jitter) runs on each batch on the device, timed with the
      loader (torch.cuda.synchronize at the end of each epoch) since the model waits for both;
      on a CPU the dataset's per-sample torchvision augmentation runs in the loader as before.
    It is iterated without a model for two epochs from the built cache: `loader_e1_ips`,
    `loader_e2_ips` (epoch 1 also pays first-use costs: CUDA kernels, page faults).
    `augment_ips`: the device augmentation alone (CUDA events around each BatchAugment call;
    GPU time the model step does not get), blank where augmentation runs in the dataset.
(b) The model: bench/train_speed.measure (fit's step on fit's set-up, random input of the same
    size and batch: bf16 autocast where the GPU has it, channels_last where it has tensor cores).

ratio = loader images/s / model images/s; verdict "starved" where the loader (epoch 2)
is the slower side, "starved (epoch 1)" where only the first epoch is.
On a CPU-only machine the loader and the model share the same cores (with workers=0
the same thread), so there the real training rate is about 1 / (1/loader + 1/model).
On CUDA the device augmentation and the model share the GPU: the GPU side runs at about
1 / (1/augment + 1/model).

    python bench/loader_vs_model.py                       # demo profile, data/demo_desert, this device
    python bench/loader_vs_model.py --profile full --workers 4 8 16 --data /path/to/Falcon
    python bench/loader_vs_model.py --quick               # tiny smoke run (seconds)
    python bench/loader_vs_model.py --profile full --batches 16,32   # one row per model and batch

--augment device|dataset overrides where the augmentation runs (default: where training runs it);
--cache-root puts the temporary decode caches under that folder (default: the system temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Results,
    add_output_options,
    demo_data,
    model_label,
    parse_size,
    profile_models,
    size_str,
    table,
)
from train_speed import measure  # noqa: E402

from offroadseg.chapters import assembly  # noqa: E402
from offroadseg.data import find_dataset  # noqa: E402
from offroadseg.dataset import PARALLEL_MIN_PAIRS  # noqa: E402
from offroadseg.device import default_device, precision_name, synchronize  # noqa: E402
from offroadseg.engine import make_accelerator  # noqa: E402
from offroadseg.profiles import PROFILES  # noqa: E402
from offroadseg.sampling import make_loaders  # noqa: E402
from offroadseg.scan import scan_dataset, usable_pairs  # noqa: E402

COLUMNS = ["role", "model", "size", "batch", "workers", "augment", "cache_build_s", "decode_ips", "loader_e1_ips",
           "loader_e2_ips", "augment_ips", "model_ips", "ratio_e1", "ratio_e2", "verdict"]


def scan_and_weights(root: Path, limit: int | None):
    """The scan (in memory, as `teachers.train_teacher` gets it) and its train sample weights; with
    `limit` both keep only the first `limit` train pairs, so the decode cache holds only those."""
    started = time.perf_counter()
    scan = scan_dataset(find_dataset(root), progress=False)
    scan_seconds = time.perf_counter() - started
    if limit:
        train = dict(scan["splits"]["train"], images=scan["splits"]["train"]["images"][:limit])
        scan = dict(scan, splits=dict(scan["splits"], train=train), sample_weights=scan["sample_weights"][:limit])
    return scan, list(scan["sample_weights"]), scan_seconds


def measure_loader(scan: dict, weights, image_size, batch: int, workers: int, device: torch.device, seed: int,
                   on_device: bool, cache_root: str | None = None, epochs: int = 2) -> dict:
    """Cold decode-cache build, then images/s per epoch of the training DataLoader (plus the device
    augmentation when `on_device`), iterated without a model; batches reach `device`."""
    with tempfile.TemporaryDirectory(prefix="bench-decode-cache-", dir=cache_root) as folder:
        started = time.perf_counter()
        train_set, val_set = assembly.datasets(scan, image_size, cache_dir=folder, on_device=on_device)
        cache_build_s = time.perf_counter() - started
        pairs = len(train_set)
        decoded = pairs + len(val_set)  # datasets builds the val set's cache too
        cache = {"seconds": cache_build_s, "images": decoded, "images_per_s": decoded / cache_build_s,
                 "cache_size": list(train_set.cache_size),
                 "decode_processes": 1 if pairs < PARALLEL_MIN_PAIRS else (os.cpu_count() or 1)}

        augmentation = assembly.batch_augmentation(image_size) if on_device else None
        # fit's own train loader (the val loader it also makes is not used here)
        loaders = make_loaders(train_set, train_set, batch, seed, workers, weights, 0, 1, device.type == "cuda")
        loader, sampler = loaders.train, loaders.train.sampler
        accelerator = make_accelerator("auto")
        prepared = accelerator.device.type == device.type
        if prepared:
            loader = accelerator.prepare(loader)
        timed_events = augmentation is not None and device.type == "cuda"

        torch.manual_seed(seed)  # BatchAugment draws from the global CPU generator (fit seeds it too)
        per_epoch = []
        for epoch in range(1, epochs + 1):
            if prepared:
                loader.set_epoch(epoch)
            else:
                sampler.set_epoch(epoch)
            images, augment_s, events = 0, 0.0, []
            started = time.perf_counter()
            first_batch_s = None
            for x, y in loader:
                if not prepared:
                    x, y = x.to(device), y.to(device)
                if augmentation is not None:
                    if timed_events:
                        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        begin.record()
                        x, y = augmentation(x, y)
                        end.record()
                        events.append((begin, end))
                    else:  # CPU (--augment device without a GPU): synchronous, timed directly
                        augment_started = time.perf_counter()
                        x, y = augmentation(x, y)
                        augment_s += time.perf_counter() - augment_started
                images += len(x)
                if first_batch_s is None:
                    first_batch_s = time.perf_counter() - started
            synchronize(device)
            seconds = time.perf_counter() - started
            if events:
                augment_s = sum(begin.elapsed_time(end) for begin, end in events) / 1000
            per_epoch.append({"epoch": epoch, "images": images, "seconds": seconds, "images_per_s": images / seconds,
                              "first_batch_s": first_batch_s,
                              "augment_s": augment_s if augmentation is not None else None,
                              "augment_ips": images / augment_s if augmentation is not None and augment_s > 0 else None})
        del loader, train_set  # before the folder goes: the workers are gone, the memory maps closed
    return {"workers": loaders.workers, "workers_asked": workers, "batch": batch,
            "augment": "device" if on_device else "dataset",
            "through_accelerate": prepared, "cache_build": cache, "epochs": per_epoch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--models", nargs="*", default=None,
                        help="role names (segformer deeplab student) or model names (default: the profile's roles)")
    parser.add_argument("--data", default=None, help="dataset root (default data/demo_desert, generated if missing)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train pairs")
    parser.add_argument("--size", default=None, help="HxW model input (default: the profile's image_size)")
    parser.add_argument("--batch", type=int, default=None, help="default: each plan's batch size (8 for a model name)")
    parser.add_argument("--batches", default=None,
                        help="several batch sizes, comma-separated: one row per model and batch (overrides --batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of the model (after 2 warm-up)")
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="DataLoader workers, one loader row each (default: the profile's workers)")
    parser.add_argument("--augment", default="auto", choices=("auto", "device", "dataset"),
                        help="where the augmentation runs: auto = as training (on the device with CUDA, "
                             "else per sample in the dataset)")
    parser.add_argument("--cache-root", default=None,
                        help="folder for the temporary decode caches (default: the system temp dir)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda ...")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny generated desert (unless --data), 64x96, batch 2, 1 step")
    add_output_options(parser, "loader_vs_model")
    args = parser.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",") if b.strip()] if args.batches else [args.batch]
    if any(b is not None and b < 2 for b in batches):
        parser.error("--batch must be at least 2: BatchNorm (DeepLab's ASPP pooling branch) cannot train on one image")
    profile = PROFILES[args.profile]
    device = default_device(args.device)
    precision = precision_name(device, args.precision)
    on_device = device.type == "cuda" if args.augment == "auto" else args.augment == "device"
    size = (64, 96) if args.quick else (parse_size(args.size) if args.size else tuple(profile.image_size))
    steps, warmup = (1, 1) if args.quick else (args.steps, 2)
    workers_list = args.workers if args.workers is not None else [profile.workers]
    models = []
    for spec in profile_models(profile, args.models):
        for batch in dict.fromkeys(2 if args.quick else (b or spec["batch_size"] or 8) for b in batches):
            models.append(dict(spec, batch=batch))

    with demo_data(args.data, args.quick) as root:
        scan, weights, scan_seconds = scan_and_weights(root, args.limit)
        train_pairs = len(usable_pairs(scan, "train"))
        print(f"data: {root}  ({train_pairs} train pairs, scan {scan_seconds:.1f} s)   model input: {size_str(size)}"
              f"   augmentation: {'on the device (BatchAugment)' if on_device else 'per sample in the dataset'}",
              flush=True)
        loaders = {}  # (batch, workers) -> result: one loader measurement serves every model
        for batch in sorted({spec["batch"] for spec in models}):
            for workers in workers_list:
                result = measure_loader(scan, weights, size, batch, workers, device, profile.seed, on_device,
                                        args.cache_root)
                loaders[(batch, workers)] = result
                c, e = result["cache_build"], result["epochs"]
                print(f"loader batch {batch} workers {workers}: cache build {c['seconds']:.1f} s "
                      f"({c['images_per_s']:.1f} img/s), epoch 1 {e[0]['images_per_s']:.1f} img/s, "
                      f"epoch 2 {e[1]['images_per_s']:.1f} img/s", flush=True)

    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    results = Results("loader_vs_model", args.out, args.jsonl, args.label, device=str(device), device_name=where,
                      profile=profile.name, data=str(root) if args.data else ("quick tiny desert" if args.quick else str(root)),
                      train_pairs=train_pairs, scan_seconds=scan_seconds, model_input=list(size), precision=precision,
                      quick=args.quick, augment="device" if on_device else "dataset", persistent_workers=True,
                      loaders=[{"key": list(k), **v} for k, v in loaders.items()])
    trained = {}  # same architecture, size and batch (the demo teacher and student): measured once
    for spec in models:
        key = (spec["name"], json.dumps(spec["options"], sort_keys=True), spec["batch"])
        if key not in trained:
            trained[key] = measure(spec["name"], spec["options"], size, spec["batch"], steps, args.precision,
                                   warmup=warmup)
        model = trained[key]
        print(f"model {spec['role']} {model_label(spec['name'], spec['options'])}: "
              f"{model['images_per_s']:.1f} img/s", flush=True)
        for (batch, workers), loader in loaders.items():
            if batch != spec["batch"]:
                continue
            e1, e2 = loader["epochs"][0]["images_per_s"], loader["epochs"][-1]["images_per_s"]
            ips = model["images_per_s"]
            verdict = "starved" if e2 < ips else ("starved (epoch 1)" if e1 < ips else "ok")
            results.add({"role": spec["role"], "model": model["model"], "size": size_str(size), "batch": batch,
                         "workers": loader["workers"], "workers_asked": workers, "augment": loader["augment"],
                         "cache_build_s": loader["cache_build"]["seconds"],
                         "decode_ips": loader["cache_build"]["images_per_s"],
                         "loader_e1_ips": e1, "loader_e2_ips": e2,
                         "augment_ips": loader["epochs"][-1]["augment_ips"], "model_ips": ips,
                         "ratio_e1": e1 / ips, "ratio_e2": e2 / ips, "verdict": verdict,
                         "precision": model["precision"], "model_ms_per_step": model["ms_per_step"],
                         "cache_build": loader["cache_build"], "loader_epochs": loader["epochs"],
                         "through_accelerate": loader["through_accelerate"]})

    print(f"\nprofile: {profile.name}   device: {where}   precision: {precision}   train pairs: {train_pairs}")
    print(table(results.rows, COLUMNS))
    if device.type == "cpu":
        print("note: on a CPU the loader and the model share the cores; the training rate is about "
              "1 / (1/loader + 1/model), whatever the verdict")
    elif on_device:
        print("note: the device augmentation (augment_ips) and the model share the GPU; the GPU side runs at "
              "about 1 / (1/augment + 1/model)")
    path = results.save()
    print(f"results: {path}")


if __name__ == "__main__":
    main()
