"""Train the benchmark's task models from scratch (fixed seeds) and save them as checkpoints.

    python -m steerops.bench.train --tasks ioi sorting --out /tmp/ckpt   # toy scale
    python -m steerops.bench.train --scale deep --out DIR                # 3 seeds each

Here: training one model of a scale (the scales, their model configs and recipes are
bench/scales.py), several trainers sharing a folder through their claims, and the
command line. Each model is a small LlamaForCausalLM built from its scale's config,
trained by bench/trainer.py (loss on the answer token only, until held-out accuracy
reaches the target or the step budget runs out, resumable). The checkpoint is a
safetensors file with the config, seed, steps and measured held-out accuracy in its
metadata.
"""
import json
import os
import sys
import time

import torch

from steerops.app.cli_args import Parser, nonnegative_int, output_folder, positive_int

from . import reproducible as R
from .model_store import (CHECKPOINT_DIR, build_model, checkpoint_name, checkpoint_path,
                          claim_pid, is_shipped, load_checkpoint, read_info, same_training,
                          save_checkpoint, shipped_model)
from .multihop import MULTIHOP, first_depth, multihop_task
from .scales import (MIN_ACCURACY, SCALES, model_name, pinned, plan_settings, recipe,
                     scale_tasks, task_for, training_stages)
from .tasks import TASKS
# the loop itself (train_task re-exported: tests train through here)
from .trainer import TEST_SEED, accuracy, train_task


def train_scale_task(task_name, scale, seed, *, max_steps=None, progress=True,
                     resume_path=None):
    """Trains one task model of ``scale`` with ``seed`` (the recipe SCALES fixes)."""
    spec = SCALES[scale]
    model, info = train_task(task_for(task_name, scale), progress=progress,
                             resume_path=resume_path, stages=training_stages(task_name, scale),
                             **plan_settings(task_name, scale, seed, max_steps))
    if spec.get("shared"):
        info["task_accuracy"] = shared_task_accuracy(model, scale, seed)
    info.update(depth_record(model, task_name, scale, seed))
    return model, info


def depth_record(model, task_name, scale, seed):
    """A multi-hop model's test accuracy at every depth up to h (its first depth to h):
    how far along the chain it follows, beside the 95% rule's figure at h."""
    spec = SCALES[scale]
    if task_name not in MULTIHOP or spec.get("shared"):
        return {}
    return {"depth_accuracy": {str(k): accuracy(
        model, multihop_task(task_name, k, spec["seq_len"]), 500, TEST_SEED + seed)
        for k in range(first_depth(task_name), spec["hops"] + 1)}}


def shared_task_accuracy(model, scale, seed):
    """Every task's own held-out accuracy on a shared (multitask) model."""
    return {t: accuracy(model, task_for(t, scale), 500, TEST_SEED + seed)
            for t in SCALES[scale]["tasks"]}


def train_and_save(task_name, scale, seed, path, *, max_steps=None, progress=True):
    """Trains (resuming from ``path``.resume.pt when a run was cut short) and saves."""
    model, info = train_scale_task(task_name, scale, seed, max_steps=max_steps,
                                   progress=progress, resume_path=path + ".resume.pt")
    info["scale"] = scale
    save_checkpoint(model, info, path)
    return info


def _train_pinned(task_name, scale, seed, path, max_steps, progress):
    """A pinned scale (scales.pinned) trains on the pinned CPU math paths: here when this process
    is pinned, else in a child process that is (bench/reproducible.py)."""
    import subprocess
    if not pinned(scale) or R.is_pinned():
        return train_and_save(task_name, scale, seed, path, max_steps=max_steps,
                              progress=progress)
    argv, env = R.pinned_command(
        ["steerops.bench.train", "--scale", scale, "--tasks", task_name, "--seeds", str(seed),
         "--out", os.path.dirname(path), "--max-steps", str(max_steps), "--threads", "1"]
        + ([] if progress else ["--no-progress"]))
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL)
    if done.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"training {task_name} seed {seed} ({scale}) on the pinned math "
                           f"paths failed (exit {done.returncode}); run it alone to see why: "
                           + " ".join(argv[1:]))


def checkpoint_info(task_name, scale="toy", seed=0, directory=None):
    """The checkpoint's training record without loading or training it (None when
    it is not there yet)."""
    path = checkpoint_path(model_name(task_name, scale), scale, seed, directory)
    return read_info(path) if os.path.exists(path) else None


def ensure_checkpoint(task_name, scale="toy", seed=0, directory=None, device="cpu",
                      progress=True):
    """(model, info): the shipped toy checkpoint, or a `standard` one from the cache,
    trained (deterministically: fixed seeds, recorded thread count) and cached on first use.
    On a shared scale (multitask) every task gets the one model of that seed."""
    task_name = model_name(task_name, scale)
    path = checkpoint_path(task_name, scale, seed, directory)
    directory = os.path.dirname(path)
    if scale == "toy":
        return load_checkpoint(task_name, directory, device)
    wanted = recipe(task_name, scale)
    if is_shipped(path):  # the repository's model is the model, whatever the recipe says now
        return load_checkpoint(task_name, directory, device, scale, seed)
    if os.path.exists(path) and not same_training(read_info(path), wanted):
        print(f"{path}: trained under another recipe; retraining with {wanted}",
              file=sys.stderr)
        os.remove(path)
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        _train_pinned(task_name, scale, seed, path, wanted["max_steps"], progress)
    return load_checkpoint(task_name, directory, device, scale, seed)


DEFAULT_OUT = "checkpoints/attribution"


def _claimed_elsewhere(path):
    """Whether another live process holds ``path``'s training claim."""
    return claim_pid(path) not in (None, os.getpid())


class _claim:
    """``path``.training holds the trainer's pid while it trains that model (a stale
    claim, whose process is gone, is taken over)."""

    def __init__(self, path):
        self.file = path + ".training"

    def __enter__(self):
        with open(self.file, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        try:
            os.remove(self.file)
        except OSError:
            pass


def _trained_here(path, name, args):
    """Whether ``path`` holds ``name``'s model trained as the command line's recipe
    (the scale's, with --max-steps) trains it today."""
    wanted = dict(recipe(name, args.scale), **(
        {"max_steps": args.max_steps} if args.max_steps else {}))
    return os.path.exists(path) and same_training(read_info(path), wanted)


def _carry(p, args, models):
    """--save-progress (returns True: nothing more to do) and --resume-from
    (bench/training_carry.py)."""
    from . import training_carry as C
    if args.save_progress is not None and (args.resume_from is not None or args.status):
        p.error("--save-progress trains nothing: it goes without --resume-from and --status")

    def trained(name, seed):
        return shipped_model(name, args.scale, seed) is not None or _trained_here(
            os.path.join(args.out, checkpoint_name(name, args.scale, seed)), name, args)
    if args.save_progress is not None:
        folder = args.save_progress or C.states_dir(args.scale)
        for name, seed, what in C.save_progress(args.out, folder, args.scale, models, trained):
            print(f"{name:18s} seed {seed}  {what}")
        print(f"saved states: {folder}")
        return True
    if args.resume_from is not None:
        folder = args.resume_from or C.states_dir(args.scale)
        if not os.path.isdir(folder):
            if args.resume_from:  # a folder the user named
                p.error(f"--resume-from {folder}: no such folder")
            # the repository holds no state of this scale yet: nothing to take up
            print(f"--resume-from: no saved {args.scale} states in {folder}; "
                  f"training starts from --out's own", file=sys.stderr)
            return False
        os.makedirs(args.out, exist_ok=True)
        for name, seed, what in C.resume_from(folder, args.out, args.scale, models, trained):
            if what.startswith("resumes"):  # (a pinned child process repeats this: quietly)
                print(f"{name:18s} seed {seed}  {what}", file=sys.stderr, flush=True)
    return False


def task_accuracies(scale, seed, directory):
    """(where, {task: held-out accuracy}) of a shared model: its record's, once it is
    trained or shipped; else measured now on its latest saved state (500 test pairs a
    task, as the trained model's record measures them; a minute or two on one CPU
    thread), so that a training of many hours shows which tasks already pass the 95%
    rule. (None, None) when there is neither."""
    path = os.path.join(directory, checkpoint_name("multitask", scale, seed))
    done = shipped_model("multitask", scale, seed) or (path if os.path.exists(path) else None)
    if done:
        info = read_info(done)
        return f"trained, step {info['steps']}", info["task_accuracy"]
    if not os.path.exists(path + ".resume.pt"):
        return None, None
    state = torch.load(path + ".resume.pt", weights_only=True)
    model = build_model(json.loads(state["plan"])["config"])
    model.load_state_dict(state["model"])
    return f"saved state, step {state['step']}", shared_task_accuracy(model.eval(), scale, seed)


def _print_task_accuracy(args, seeds):
    """--status --task-accuracy: every task's accuracy on each shared model."""
    from .training_status import task_accuracy_table
    torch.set_num_threads(args.threads)
    columns = []
    for seed in seeds:
        where, accuracy = task_accuracies(args.scale, seed, args.out)
        if accuracy is not None:
            columns.append((seed, where, accuracy))
    if not columns:
        print("\nno model of this scale is trained or saved yet: no task accuracy to show")
        return
    print("\nheld-out accuracy per task (500 test pairs each; <95%: below the rule)")
    print(task_accuracy_table(args.scale, columns))


def main(argv=None):
    p = Parser(
        prog="python -m steerops.bench.train",
        description="Train the attribution-benchmark task models (one small Llama per task). "
                    "Use them with: steerops bench attribution --checkpoints OUT")
    p.add_argument("--tasks", nargs="+", default=None,
                   choices=list(TASKS) + list(MULTIHOP) + ["multitask"],
                   metavar="TASK", help=f"tasks to train (default: the scale's: the 12 "
                                        f"{', '.join(TASKS)}; deep: {', '.join(MULTIHOP)}; "
                                        f"multitask: one shared model, 'multitask')")
    p.add_argument("--out", default=DEFAULT_OUT, type=output_folder,
                   help=f"folder for the checkpoints (default: {DEFAULT_OUT}); the shipped "
                        f"ones are only replaced with --overwrite-shipped")
    p.add_argument("--overwrite-shipped", action="store_true",
                   help=f"write into the package's shipped checkpoints ({CHECKPOINT_DIR})")
    p.add_argument("--scale", choices=list(SCALES), default="toy",
                   help="toy: 2 layers, d_model 64, the tasks' own lengths (shipped); standard: "
                        "4 layers, d_model 128, 24 tokens, 3 seeds; deep: the multi-hop tasks, "
                        "6 layers, 48 tokens, 3 seeds; multitask: one 6-layer model per seed "
                        "on all 15 tasks, a task token first (default: toy)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=None,
                   help="training seeds (default: 0 for toy, 0 1 2 for the others)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads, fixed and recorded in each checkpoint: training "
                        "is reproducible for a given seed and thread count (default: 1)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="step budget per task (default: the scale's recipe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--status", action="store_true",
                   help="train nothing: show where each model's training stands in --out "
                        "(trained, training now, stopped mid-way, not started)")
    p.add_argument("--task-accuracy", action="store_true",
                   help="with --status, on the multitask scale: every task's held-out "
                        "accuracy on each shared model (its latest saved state, measured "
                        "now: a minute or two a model), beside the 95%% rule")
    p.add_argument("--save-progress", nargs="?", const="", default=None, metavar="FOLDER",
                   help="train nothing: copy each unfinished model's latest saved state from "
                        "--out into FOLDER, to commit it or carry it to another machine "
                        "(default FOLDER: the repository's bench/training_states/SCALE)")
    p.add_argument("--resume-from", nargs="?", const="", default=None, metavar="FOLDER",
                   help="first take from FOLDER every saved state that is further along than "
                        "--out's, then train (or show --status) as usual (default FOLDER: "
                        "bench/training_states/SCALE)")
    args = p.parse_args(argv)
    args.tasks = args.tasks or scale_tasks(args.scale)
    if SCALES[args.scale].get("shared"):  # one model for every task of the scale
        args.tasks = ["multitask"]
    wrong = [t for t in args.tasks if t not in scale_tasks(args.scale) + ["multitask"]
             or (t == "multitask") != bool(SCALES[args.scale].get("shared"))]
    if wrong:
        p.error(f"--tasks {' '.join(wrong)}: not tasks of the {args.scale} scale (its tasks: "
                f"{', '.join(scale_tasks(args.scale))})")
    seeds = args.seeds if args.seeds is not None else SCALES[args.scale]["seeds"]
    models = [(name, seed) for seed in seeds for name in args.tasks]
    if args.task_accuracy and not (args.status and SCALES[args.scale].get("shared")):
        p.error("--task-accuracy goes with --status on the multitask scale (a one-task "
                "model's held-out accuracy is its task's: --status shows it)")
    if _carry(p, args, models):
        return
    if args.status:
        from .training_status import model_status, status_table
        print(status_table([model_status(name, args.scale, seed, args.out, args.max_steps)
                            for seed in seeds for name in args.tasks]))
        if args.task_accuracy:
            _print_task_accuracy(args, seeds)
        return
    if pinned(args.scale) and args.threads == 1 and not R.is_pinned():
        # the pinned math paths are read when torch loads: run again in a process that has them
        import subprocess
        cmd, env = R.pinned_command(["steerops.bench.train", *(argv if argv is not None
                                                               else sys.argv[1:])])
        raise SystemExit(subprocess.call(cmd, env=env))
    if args.overwrite_shipped:
        if args.scale != "toy":
            p.error("--overwrite-shipped only applies to the toy scale")
        args.out = CHECKPOINT_DIR
    elif os.path.abspath(args.out) == os.path.abspath(CHECKPOINT_DIR):
        p.error("--out names the shipped checkpoints; add --overwrite-shipped to replace them")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    pending = list(models)  # seed-major: an interrupted run has every task at the earlier seeds
    announced = None
    while pending:
        # one trainer per model: a model another process is training is left for later
        # (several trainers on one folder share the work); when only such models are
        # left, wait for them
        name, seed = next((j for j in pending if not _claimed_elsewhere(
            os.path.join(args.out, checkpoint_name(j[0], args.scale, j[1])))), (None, None))
        if name is None:
            if pending != announced:  # say why nothing moves (a run on demand waits here)
                print(f"waiting for {', '.join(f'{n} seed {s}' for n, s in pending)}: "
                      f"another process is training them in {args.out} (see --status)",
                      file=sys.stderr, flush=True)
                announced = list(pending)
            time.sleep(10)
            pending = [j for j in pending if not os.path.exists(
                os.path.join(args.out, checkpoint_name(j[0], args.scale, j[1])))]
            continue
        pending.remove((name, seed))
        # the repository's model is the model (bench/ship.py): a background trainer of an
        # unpinned scale leaves it be; a pinned scale trains here what a caller that found
        # none shipped asked for (ensure_checkpoint's child process)
        shipped = None if pinned(args.scale) else shipped_model(name, args.scale, seed)
        if shipped:
            print(f"{name:18s} seed {seed} shipped: {shipped}", flush=True)
            continue
        path = os.path.join(args.out, checkpoint_name(name, args.scale, seed))
        with _claim(path):
            if _trained_here(path, name, args):
                print(f"{name:18s} seed {seed} already trained: {path}", flush=True)
                continue  # a rerun of a cut-short batch goes on where it stopped
            info = train_and_save(name, args.scale, seed, path, max_steps=args.max_steps,
                                  progress=not args.no_progress)
        flag = "" if info["held_out_accuracy"] >= MIN_ACCURACY else "  BELOW 95%"
        print(f"{name:18s} seed {seed} steps {info['steps']:5d}  held-out acc "
              f"{info['held_out_accuracy']:.4f}  ({info['train_seconds']} s){flag}",
              flush=True)


if __name__ == "__main__":
    main()
