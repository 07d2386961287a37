"""Data loader images/s against model training images/s, per model: is the accelerator starved?

(a) The loader: the training DataLoader built as `engine.fit` builds it (same dataset
    from `training.datasets`: decode + resize to 1.5x the model input, cached in memory,
    then the training augmentation; the weighted `EpochSampler` with the scan's sample
    weights, drop_last, `num_workers`, `seed_worker`, pin_memory on CUDA, wrapped by
    accelerate's `prepare` which copies each batch to the device). It is iterated
    without a model: epoch 1 decodes the PNGs, epoch 2 can use the in-memory cache.
    Caveat measured, not hidden: fit's workers are not persistent, so with workers > 0
    each epoch starts fresh worker processes whose caches die with them, and epoch 2
    decodes again. A second row "persistent" (NOT what fit does) shows what keeping the
    workers would give; --no-persistent skips it.
(b) The model: bench/train_speed.measure (forward + loss + backward + AdamW on random
    input of the same size and batch; bf16 autocast + channels_last on CUDA).

e2_cache_hits: the share of epoch 2's samples already decoded in the process that loads
them (the weighted sampler draws with replacement, so epoch 1 sees only ~63% of the
images); 0 for fit's non-persistent workers, blank where unknown (several persistent workers).

ratio = loader images/s / model images/s; verdict "starved" where the loader (epoch 2)
is the slower side, "starved (epoch 1)" where only the decoding epoch is.
On a CPU-only machine the loader and the model share the same cores (with workers=0
the same thread), so there the real training rate is about 1 / (1/loader + 1/model).

    python bench/loader_vs_model.py                       # demo profile, data/demo_desert, this device
    python bench/loader_vs_model.py --profile full --workers 4 8 16 --data /path/to/Falcon
    python bench/loader_vs_model.py --quick               # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (demo_data, model_label, parse_size, profile_models, resolve_device, resolve_precision,  # noqa: E402
                    save_results, size_str, table)
from train_speed import measure  # noqa: E402

from offroadseg import training  # noqa: E402
from offroadseg.data import find_dataset  # noqa: E402
from offroadseg.engine import EpochSampler, _epoch_seed, make_accelerator, resolve_precision as engine_precision, seed_worker  # noqa: E402
from offroadseg.profiles import PROFILES  # noqa: E402
from offroadseg.scan import scan_dataset  # noqa: E402

COLUMNS = ["role", "model", "size", "batch", "workers", "loader", "loader_e1_ips", "loader_e2_ips", "e2_cache_hits",
           "model_ips", "ratio_e1", "ratio_e2", "verdict"]


def train_set_and_weights(root: Path, image_size, limit: int | None):
    """The train dataset and sample weights exactly as `training.train_teacher` gets them (scan in memory)."""
    started = time.perf_counter()
    scan = scan_dataset(find_dataset(root), progress=False)
    scan_seconds = time.perf_counter() - started
    train_set, _ = training.datasets(scan, image_size)
    weights = list(scan["sample_weights"])
    if limit:
        train_set.pairs = train_set.pairs[:limit]
        weights = weights[:limit]
    return train_set, weights, scan_seconds


def measure_loader(train_set, weights, batch: int, workers: int, device: torch.device, seed: int,
                   persistent: bool = False, epochs: int = 2) -> dict:
    """images/s per epoch of the training DataLoader, iterated without a model (batches reach `device`)."""
    train_set._cached.clear()  # every measurement starts from an empty cache, as a fresh fit does
    sampler = EpochSampler(len(train_set), seed, weights)
    worker_seeds = torch.Generator()
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch, sampler=sampler, drop_last=len(train_set) >= batch,
        num_workers=workers, worker_init_fn=seed_worker, generator=worker_seeds, pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
    )
    accelerator = make_accelerator(engine_precision("auto"))
    prepared = accelerator.device.type == device.type
    if prepared:
        loader = accelerator.prepare(loader)

    per_epoch, seen = [], set()
    for epoch in range(1, epochs + 1):
        if prepared:
            loader.set_epoch(epoch)
        else:
            sampler.set_epoch(epoch)
        worker_seeds.manual_seed(_epoch_seed(seed, epoch, 1))
        # Which of this epoch's samples an in-process cache already holds (fit order: drop_last trims the tail).
        sampler.set_epoch(epoch)
        order = list(sampler)[: len(loader) * batch] if len(train_set) >= batch else list(sampler)
        hits = sum(i in seen for i in order) / max(1, len(order))
        seen.update(order)
        images = 0
        started = time.perf_counter()
        first_batch_s = None
        for x, y in loader:
            if not prepared:
                x, y = x.to(device), y.to(device)
            images += len(x)
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        # The cache lives in the process that decodes: the main one (workers=0) or each worker. Fit's workers
        # are not persistent, so their caches die every epoch; persistent workers each hold their own cache
        # and see only some of the samples, so the share of hits is unknown there (beyond one worker).
        if workers == 0 or (persistent and workers == 1):
            cache_hits = hits
        else:
            cache_hits = None if persistent else 0.0
        per_epoch.append({"epoch": epoch, "images": images, "seconds": seconds, "images_per_s": images / seconds,
                          "first_batch_s": first_batch_s, "cache_hits": cache_hits})
    del loader
    return {"loader": "persistent" if persistent and workers > 0 else "as fit", "workers": workers, "batch": batch,
            "through_accelerate": prepared, "epochs": per_epoch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--models", nargs="*", default=None,
                        help="role names (segformer deeplab student) or model names (default: the profile's roles)")
    parser.add_argument("--data", default=None, help="dataset root (default data/demo_desert, generated if missing)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train pairs")
    parser.add_argument("--size", default=None, help="HxW model input (default: the profile's image_size)")
    parser.add_argument("--batch", type=int, default=None, help="default: each plan's batch size (8 for a model name)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of the model (after 2 warm-up)")
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="DataLoader workers, one loader row each (default: the profile's workers)")
    parser.add_argument("--no-persistent", action="store_true",
                        help="skip the persistent-workers variant (measured by default when workers > 0)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda ...")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny generated desert (unless --data), 64x96, batch 2, 1 step")
    parser.add_argument("--out", default=None, help="JSON results path (default bench/results/loader_vs_model.json)")
    args = parser.parse_args(argv)

    if args.batch is not None and args.batch < 2:
        parser.error("--batch must be at least 2: BatchNorm (DeepLab's ASPP pooling branch) cannot train on one image")
    profile = PROFILES[args.profile]
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    size = (64, 96) if args.quick else (parse_size(args.size) if args.size else tuple(profile.image_size))
    steps, warmup = (1, 1) if args.quick else (args.steps, 2)
    workers_list = args.workers if args.workers is not None else [profile.workers]
    models = profile_models(profile, args.models)
    for spec in models:
        spec["batch"] = 2 if args.quick else (args.batch or spec["batch_size"] or 8)

    with demo_data(args.data, args.quick) as root:
        train_set, weights, scan_seconds = train_set_and_weights(root, size, args.limit)
        print(f"data: {root}  ({len(train_set)} train pairs, scan {scan_seconds:.1f} s)   model input: {size_str(size)}",
              flush=True)
        loaders = {}  # (batch, workers, persistent) -> result: one loader measurement serves every model
        for batch in sorted({spec["batch"] for spec in models}):
            for workers in workers_list:
                for persistent in ([False] if workers == 0 or args.no_persistent else [False, True]):
                    result = measure_loader(train_set, weights, batch, workers, device, profile.seed, persistent)
                    loaders[(batch, workers, persistent)] = result
                    e = result["epochs"]
                    print(f"loader batch {batch} workers {workers} ({result['loader']}): epoch 1 "
                          f"{e[0]['images_per_s']:.1f} img/s, epoch 2 {e[1]['images_per_s']:.1f} img/s", flush=True)

    trained = {}  # same architecture, size and batch (the demo teacher and student): measured once
    rows = []
    for spec in models:
        key = (spec["name"], json.dumps(spec["options"], sort_keys=True), spec["batch"])
        if key not in trained:
            trained[key] = measure(spec["name"], spec["options"], size, spec["batch"], steps, device, precision,
                                   warmup=warmup)
        model = trained[key]
        print(f"model {spec['role']} {model_label(spec['name'], spec['options'])}: "
              f"{model['images_per_s']:.1f} img/s", flush=True)
        for (batch, workers, persistent), loader in loaders.items():
            if batch != spec["batch"]:
                continue
            e1, e2 = loader["epochs"][0]["images_per_s"], loader["epochs"][-1]["images_per_s"]
            ips = model["images_per_s"]
            verdict = "starved" if e2 < ips else ("starved (epoch 1)" if e1 < ips else "ok")
            rows.append({"role": spec["role"], "model": model["model"], "size": size_str(size), "batch": batch,
                         "workers": workers, "loader": loader["loader"], "loader_e1_ips": e1, "loader_e2_ips": e2,
                         "e2_cache_hits": loader["epochs"][-1]["cache_hits"], "model_ips": ips,
                         "ratio_e1": e1 / ips, "ratio_e2": e2 / ips, "verdict": verdict,
                         "precision": model["precision"], "model_ms_per_step": model["ms_per_step"],
                         "loader_epochs": loader["epochs"], "through_accelerate": loader["through_accelerate"]})

    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\nprofile: {profile.name}   device: {where}   precision: {precision}   train pairs: {len(train_set)}")
    print(table(rows, COLUMNS))
    if device.type == "cpu":
        print("note: on a CPU the loader and the model share the cores; the training rate is about "
              "1 / (1/loader + 1/model), whatever the verdict")
    path = save_results("loader_vs_model", rows, args.out, device=str(device), device_name=where,
                        profile=profile.name, data=str(root) if args.data else ("quick tiny desert" if args.quick else str(root)),
                        train_pairs=len(train_set), scan_seconds=scan_seconds, model_input=list(size),
                        precision=precision, quick=args.quick,
                        loaders=[{"key": list(k), **v} for k, v in loaders.items()])
    print(f"results: {path}")


if __name__ == "__main__":
    main()
