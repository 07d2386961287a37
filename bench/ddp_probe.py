"""Several processes train one model for one short epoch under torchrun (DDP: NCCL on GPUs, gloo on
a CPU) through `engine.fit`, as `python -m offroadseg.train` and the notebooks' launcher run it:
images/s over all processes, and whether every process ends with the same weights.

    python bench/ddp_probe.py --data data/demo_desert --processes 2           # two GPUs
    python bench/ddp_probe.py --data DESERT --processes 2 --cpu --size 32x48  # a CPU rehearsal (gloo)

The parent starts `torch.distributed.run --standalone --nproc_per_node N` on this same script
(`--child`); each process trains the profile's role (default: the student's model, from scratch,
with the scan's sample and class weights, the training augmentation where training puts it) on the
data's train split for one epoch, validates on val, and saves its final weights; the parent
compares them and reads the epoch's images/s from history.json. --jsonl appends the row as soon as
it is measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, add_output_options, parse_size, profile_models  # noqa: E402

from offroadseg.chapters import assembly  # noqa: E402
from offroadseg.data import find_dataset  # noqa: E402
from offroadseg.engine import TrainConfig, fit  # noqa: E402
from offroadseg.files import read_json  # noqa: E402
from offroadseg.models import build_model  # noqa: E402
from offroadseg.profiles import PROFILES  # noqa: E402
from offroadseg.scan import scan_dataset  # noqa: E402


def child(args) -> None:
    """One process of the run (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    profile = PROFILES[args.profile]
    spec = profile_models(profile, [args.role])[0]
    size = parse_size(args.size) if args.size else tuple(profile.image_size)
    scan = scan_dataset(find_dataset(args.data), progress=False)
    on_device = assembly.augment_on_device()
    train_set, val_set = assembly.datasets(scan, size, cache_dir=Path(args.work) / "cache", on_device=on_device)
    torch.manual_seed(0)
    model = build_model(spec["name"], **spec["options"])
    config = TrainConfig(epochs=1, batch_size=args.batch or spec["batch_size"], lr=1e-4, seed=profile.seed,
                         num_workers=profile.workers)
    fit(model, train_set, val_set, config, Path(args.work) / "run", loss_fn=assembly.segmentation_loss(scan),
        sample_weights=scan["sample_weights"], progress=False,
        batch_transform=assembly.batch_augmentation(size) if on_device else None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, Path(args.work) / f"rank{os.environ.get('RANK', '0')}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def parent(args) -> dict:
    """Start the processes, wait, compare their weights: the row."""
    work = Path(args.work or tempfile.mkdtemp(prefix="ddp-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    forwarded = ["--profile", args.profile, "--role", args.role, "--data", str(Path(args.data).resolve()),
                 "--work", str(work)]
    forwarded += ["--size", args.size] if args.size else []
    forwarded += ["--batch", str(args.batch)] if args.batch else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
               str(Path(__file__).resolve()), "--child", *forwarded]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - started
    print(done.stdout[-3000:], end="")
    if done.returncode != 0:
        print(done.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"ddp_probe: torchrun exited with {done.returncode} (its output is above)")
    states = [torch.load(work / f"rank{rank}.pt") for rank in range(args.processes)]
    identical = all(torch.equal(states[0][k], other[k]) for other in states[1:] for k in states[0])
    history = read_json(work / "run" / "history.json")
    return {"processes": args.processes, "device": "cpu (gloo)" if args.cpu else "cuda (nccl)",
            "model": profile_models(PROFILES[args.profile], [args.role])[0]["name"],
            "images_per_s": history[-1]["images_per_s"], "val_miou": history[-1]["val_miou"],
            "identical_weights": identical, "seconds": seconds, "backend": history[-1].get("backend")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--role", default="student", choices=("segformer", "deeplab", "student"))
    parser.add_argument("--data", required=True, help="dataset root (e.g. data/demo_desert)")
    parser.add_argument("--size", default=None, help="HxW model input (default: the profile's image_size)")
    parser.add_argument("--batch", type=int, default=None, help="per process (default: the plan's)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU, no GPU (a rehearsal)")
    parser.add_argument("--work", default=None, help="folder for the run, the caches and the weights (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_output_options(parser, "ddp_probe")
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    results = Results("ddp_probe", args.out, args.jsonl, args.label, profile=args.profile, role=args.role)
    row = results.add(parent(args))
    print(f"{row['processes']} processes on {row['device']}: {row['images_per_s']:.1f} img/s, "
          f"weights {'identical' if row['identical_weights'] else 'DIFFER between processes'}")
    print(f"results: {results.save()}")


if __name__ == "__main__":
    main()
