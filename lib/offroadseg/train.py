"""Training without a notebook: the teachers, the distilled student and the adapted student from a shell.

    python -m offroadseg.train teacher [--model segformer|deeplab|both] [options]   # notebooks 02 and 03
    python -m offroadseg.train student [options]                                    # notebook 05's student
    python -m offroadseg.train adapt [options]                                      # notebook 05's adapted student
    python -m offroadseg.train average --model student --last 3 [options]           # its last 3 epochs averaged

    options: --profile demo|full  --run NAME  --data PATH  --set NAME=VALUE ...  --weights DIR
             --track tensorboard (repeatable; `all`: every tracker accelerate finds installed)

On every GPU of one machine, or on several machines (one process per GPU, a shared file system
for outputs/):

    accelerate launch -m offroadseg.train teacher --profile full --data /data/offroad --weights weights/
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        -m offroadseg.train teacher --profile full --data /data/offroad --weights weights/

The same profiles, `--set` parameters and run folders as the notebooks, and the same code: each
command calls the chapter functions its notebook calls (`chapters.teachers.train_teacher`,
`chapters.distillation.train_student`, `chapters.new_desert`'s preparation, training and
recalibration of the adapted student), records its step in run.json under the notebook's name, and
leaves the files the notebook leaves (models/<role>/best.pt, last.pt, history.json). Run the
notebooks afterwards for the figures and the evaluation: they reuse what is trained. Interrupted,
the same command resumes from last.pt. A `teacher` run on a run folder without scan.json scans the
data first, as notebook 01 does; `student` needs notebook 04's ensemble.json, `adapt` the student.

Process 0 alone writes (run.json, scan.json, adaptation.json, the checkpoints) and holds the run
folder's lock; the others wait for it where they need what it wrote. `--track` logs loss, learning
rate, val mIoU and per-class IoU every epoch through accelerate's trackers (TensorBoard's event files
under models/<role>/tracking/); history.json stays the record. Mistakes on the command line exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from dataclasses import dataclass

from accelerate.utils import broadcast_object_list

from .averaging import EPOCHS_DIR, average_checkpoints, kept_epochs
from .chapters import context, distillation, new_desert, teachers
from .chapters.assembly import model_plan, train_config, val_dataset
from .checkpoints import load_model
from .cli import UsageError, add_common_options, resolve_common
from .dataset import eval_loader
from .evaluate import evaluate_model
from .files import read_json
from .runs import RunLock, run_dir
from .scan import load_or_scan, read_scan
from .tracking import check_trackers
from .train_step import process_state

COMMANDS = ("teacher", "student", "adapt", "average")
ENTRY = "python -m offroadseg.train"  # how run.json names a step this command finished (`by`)
TEACHER_CHOICES = ("segformer", "deeplab", "both")
# What `average` averages: the roles fit trains (their last epochs kept with --set keep_epochs=K).
AVERAGE_CHOICES = ("segformer", "deeplab", "student", "student_adapted")


@dataclass
class Job:
    """What one command trains: its options, checked, and the processes it runs on."""

    command: str
    options: object  # cli.CommonOptions
    track: tuple[str, ...]
    state: object  # accelerate's PartialState: which process this is, of how many

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    def start(self, step: str, **parameters) -> context.Context:
        """`context.start` for this job's run, process 0 first (it records the step in run.json and makes
        the demo desert when that is the data); the other processes read what it settled."""
        with self.state.main_process_first():
            return self.start_here(step, **parameters)

    def start_here(self, step: str, record: bool = True, **parameters) -> context.Context:
        """`context.start` in this process alone (recording the step if it is process 0 and `record`)."""
        return context.start(step, run=self.options.run, profile=self.options.profile, data=self.options.data,
                             record=self.main and record, **parameters)

    def decide(self, value):
        """Process 0's `value`, on every process (a decision only process 0 can make, such as
        adaptation.json's contents)."""
        box = [value]
        if self.state.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]


# ----------------------------------------------------------------------------- the commands


def ensure_scan(job: Job) -> None:
    """Notebook 01's scan of the data when this run has none yet (process 0; the others wait for it)."""
    if job.main and not run_dir(job.options.run).scan.exists():
        ctx = job.start_here("01_data_scan")
        print(f"{ctx.rel(ctx.run.scan)} not found: scanning the data first, as notebook 01 does", flush=True)
        scan = load_or_scan(ctx.data_root, ctx.run.scan)
        context.finish(ctx, usable=scan["splits"]["train"]["usable"], by=ENTRY)
    job.state.wait_for_everyone()


def train_teachers(job: Job, which: str) -> None:
    ensure_scan(job)
    sets = job.options.sets
    for role in (("segformer", "deeplab") if which == "both" else (which,)):
        ctx = job.start(teachers.STEPS[role], **{name: sets.get(name) for name in teachers.SETTINGS})
        chapter = teachers.teacher_chapter(ctx, role, weights_dir=job.options.weights,
                                           **teachers.plan_overrides(sets))
        if job.main:
            print(chapter.describe(), flush=True)
        teachers.train_teacher(ctx, role, chapter.scan, chapter.plan, chapter.config, track=job.track)
        job.state.wait_for_everyone()
        if job.main:
            chapter.history = read_json(ctx.run.history(role))
            print(f"{role}: {chapter.training_summary()}", flush=True)
            chapter.record(by=ENTRY)


def student_setup(job: Job):
    """Notebook 05's context, scan, student plan, training settings and distillation settings."""
    sets = job.options.sets
    ctx = job.start(distillation.STEP, **{name: sets.get(name) for name in distillation.SETTINGS + new_desert.SETTINGS})
    scan = read_scan(context.require(ctx, "scan.json"))
    plan = model_plan(ctx.profile, "student", weights_dir=job.options.weights, **distillation.plan_overrides(sets))
    distill = distillation.distill_config(ctx.profile, **distillation.distill_overrides(sets))
    return ctx, scan, plan, train_config(ctx.profile, plan), distill


def train_student(job: Job) -> None:
    ctx, scan, plan, config, distill = student_setup(job)
    if job.main:
        print(f"student: {plan.name}, initialised from: {plan.init_from or plan.pretrained or 'scratch'}", flush=True)
    distillation.train_student(ctx, scan, plan, config, distill, track=job.track)
    job.state.wait_for_everyone()
    if job.main:
        best = distillation.student_summary(ctx)
        context.finish(ctx, best_val_miou=best["val_miou"], best_epoch=best["epoch"], backend=best.get("backend"),
                       by=ENTRY)


def train_adapted(job: Job) -> None:
    ctx, scan, plan, config, distill = student_setup(job)
    adapting = new_desert.adapt_config(ctx.profile, **new_desert.adapt_overrides(job.options.sets))
    # Process 0 measures the confidence rule and writes adaptation.json; every process trains from its record.
    prepared = job.decide(new_desert.prepare_adaptation(ctx, scan, plan, config, adapting) if job.main else None)
    if prepared is None:
        return
    new_desert.train_adapted_student(ctx, scan, prepared.plan, prepared.config, distill, prepared.images,
                                     prepared.threshold, prepared.holdout, track=job.track)
    job.state.wait_for_everyone()
    if job.main:
        record = new_desert.finish_adaptation(ctx, prepared)
        best = distillation.student_summary(ctx, new_desert.ADAPTED_STUDENT)
        context.finish(ctx, adapted_best_val_miou=best["val_miou"], adapted_images=len(record["images"]), by=ENTRY)


def average_epochs(job: Job, role: str, last: int) -> int:
    """models/<role>_avg<last>/best.pt: the average of the last `last` kept epochs of models/<role>/
    (`averaging.average_checkpoints`), scored on val at the masks' native size beside best.pt."""
    ctx = job.start_here("averaging", record=False) if job.main else None
    if ctx is None:
        return 0
    kept = kept_epochs(ctx.run.model_dir(role))
    if len(kept) < last:
        print(f"{ENTRY}: {ctx.rel(ctx.run.model_dir(role))}/{EPOCHS_DIR}/ holds {len(kept)} epoch file(s), {last} needed: "
              f"train it with --set keep_epochs={last}", file=sys.stderr)
        return 2
    out = ctx.run.checkpoint(f"{role}_avg{last}")
    record = average_checkpoints(kept[-last:], out)
    scan = read_scan(context.require(ctx, "scan.json"))
    loader = eval_loader(val_dataset(scan, ctx.profile.image_size, native_masks=True), 4)
    scores = {name: evaluate_model(load_model(path), loader)["miou"] for name, path in
              (("averaged", out), ("best.pt", ctx.run.require(ctx.run.checkpoint(role))))}
    print(f"{ctx.rel(out)}: epochs {record['epochs']} of {role} averaged; val mIoU {scores['averaged']:.4f} "
          f"(its best.pt {scores['best.pt']:.4f})")
    return 0


# ----------------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m offroadseg.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="what to train")
    parser.add_argument("--model", choices=sorted(set(TEACHER_CHOICES + AVERAGE_CHOICES)), default=None,
                        help="teacher: which one (default: both, SegFormer then DeepLab); average: whose epochs "
                             "(default: student)")
    parser.add_argument("--last", type=int, default=3, help="average: how many of the last kept epochs (default 3)")
    add_common_options(parser)
    parser.add_argument("--track", action="append", default=[], metavar="TRACKER",
                        help="log every epoch to this accelerate tracker too (tensorboard, wandb, mlflow, ...; "
                             "repeatable; all: every one installed)")
    return parser


def valid_settings(command: str) -> tuple[str, ...]:
    """The --set names a command takes: its notebook's training parameters."""
    if command == "average":
        return ()
    if command == "teacher":
        return teachers.SETTINGS
    return distillation.SETTINGS + (new_desert.SETTINGS if command == "adapt" else ())


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The common options resolved (`cli.resolve_common`), the --set names and --track trackers checked."""
    options = resolve_common(args)
    valid = valid_settings(args.command)
    unknown = sorted(set(options.sets) - set(valid))
    if unknown:
        raise UsageError(f"--set {', '.join(unknown)}: `{args.command}` has no such parameter; "
                         f"valid names: {', '.join(valid)}")
    if args.command in ("student", "adapt") and args.model is not None:
        raise UsageError(f"--model chooses a teacher (or what `average` averages); `{args.command}` trains the student "
                         "(its architecture: --set model=NAME)")
    if args.command == "teacher" and args.model not in (None, *TEACHER_CHOICES):
        raise UsageError(f"--model {args.model}: teacher takes {', '.join(TEACHER_CHOICES)}")
    if args.command == "average" and (args.model not in (None, *AVERAGE_CHOICES) or args.last < 2):
        raise UsageError(f"average takes --model {'|'.join(AVERAGE_CHOICES)} and --last 2 or more "
                         f"(got {args.model}, {args.last})")
    try:
        track = check_trackers(args.track)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return options, track


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    state = process_state()
    try:
        # Every process checks the options (each needs them); only process 0 says what it found.
        with contextlib.nullcontext() if state.is_main_process else contextlib.redirect_stdout(io.StringIO()):
            options, track = check_options(parser, args)
    except UsageError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2
    job = Job(args.command, options, track, state)
    folder = run_dir(options.run)
    # One runner at a time per run folder: a notebook run (./run_all.sh) or another training command.
    with RunLock(folder.dir, holder=ENTRY) if job.main else contextlib.nullcontext():
        if args.command == "average":
            return average_epochs(job, args.model or "student", args.last)
        if args.command == "teacher":
            train_teachers(job, args.model or "both")
        elif args.command == "student":
            train_student(job)
        else:
            train_adapted(job)
        job.state.wait_for_everyone()
    if job.main:
        print(f"done: {folder.dir} (the notebooks reuse what is trained: ./run_all.sh --run {options.run} ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
