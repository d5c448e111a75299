"""The attribution benchmark (protocol version 4, docs/protocol.md): do steering
vectors recover activation patching's causal attribution at a fraction of its compute,
and does each reading beat its own random-direction twin and a positional guess?

    steerops bench attribution --quick         # toy scale, one seed, about two minutes on CPU
    steerops bench attribution                 # standard scale, 3 training x 3 nested split seeds

Every method of ``bench.methods`` (and every control of ``bench.controls``) is scored
against patching on the informative sites S* and priced on both sides
(``bench.evaluate``); runs are aggregated over seeds with bootstrap intervals
(``bench.aggregate``, ``bench.headline``) and reported as JSON, Markdown and plots
(``bench.reporting``). Each run is saved as a compressed shard under ``OUT/runs`` as
soon as it finishes, so a killed run continues where it stopped.
"""
import contextlib
import os
import sys
import time

import torch

from steerops.sweeps import distributed as dist
from steerops.app.cli_args import (FolderLock, Parser, UsageError, device, existing_folder,
                               nonnegative_int, output_folder, positive_int)

from . import controls as C
from .aggregate import summarize
from .evaluate import run_one
from .provenance import environment, read_shard, save_results, write_json, write_shard
from .run_store import (PROTOCOL_VERSION, committed_hashes, compact, models_seen, read_record,
                        record_path, set_aside_stale, shard_path)
from .realistic import break_even_curves, compute_curves, realistic
from .plots import plots
from .reporting import markdown, no_verdict_markdown
from .multihop import MULTIHOP
from .tasks import TASKS
from .model_store import checkpoint_path
from .scales import MIN_ACCURACY, SCALES, model_name, scale_tasks, task_accuracy, task_for
from .train import checkpoint_info, ensure_checkpoint

PROTOCOL_DOC = "docs/protocol.md"
# pairs per split, within-run bootstrap draws, hierarchical bootstrap draws, S2
# optimisation steps, timing repeats (on each model's first split seed), split seeds,
# pairs of the realistic-size measurements (every stage, both sides)
# (--quick prices the realistic sizes but measures none: GPT-2-small's stages alone
# take a minute on one CPU thread)
QUICK = dict(scale="toy", n_fit=32, n_val=16, n_eval=24, s2_steps=10, n_boot=100,
             n_boot_hier=400, repeats=1, split_seeds=1, realistic_pairs=0,
             realistic_pairs_1b=0)
FULL = dict(scale="standard", n_fit=64, n_val=32, n_eval=48, s2_steps=30, n_boot=200,
            n_boot_hier=1000, repeats=3, split_seeds=3, realistic_pairs=4,
            realistic_pairs_1b=1)
SEED = 1234


def model_record(info):
    """What a run records of its task model (from the checkpoint's metadata)."""
    return {"held_out_accuracy": info["held_out_accuracy"], "train_steps": info["steps"],
            "seed": info["seed"], "config": info["config"], "threads": info.get("threads"),
            "train_seconds": info.get("train_seconds"),
            # the CPU and math paths the weights were trained on (they depend on the CPU:
            # docs/protocol.md, "Reproducible models"); None for older checkpoints
            "math_paths": info.get("math_paths"),
            # a shipped model (bench/ship.py): stored in fp16, the stored weights are the
            # model; the float32 weights it was trained as had this hash and accuracy
            "stored_dtype": info.get("stored_dtype"),
            "trained_sha256": info.get("trained_sha256"),
            "trained_held_out_accuracy": info.get("trained_held_out_accuracy")}


def split_seeds(task_name, train_seed, settings):
    """The split seeds of one task model: nested in its training seed (docs/protocol.md
    v4), so the models of a task never share a pair pool."""
    return [C.split_seed(task_name, train_seed, i) for i in range(settings["split_seeds"])]


def _run_jobs(jobs, *, settings, scale, out_dir, environment, checkpoint_dir, device,
              progress):
    """Runs the jobs whose shard is missing; returns (how many it ran, the models
    excluded for held-out accuracy below 95%, whose jobs are skipped)."""
    from tqdm.auto import tqdm
    ran, excluded = 0, {}
    bar = tqdm(jobs, desc=f"attribution benchmark ({scale})", disable=not progress)
    for task_name, train_seed, split_seed in bar:
        path = shard_path(out_dir, settings, task_name, train_seed, split_seed)
        if os.path.exists(path) or (task_name, train_seed) in excluded:
            continue
        bar.set_postfix_str(f"{task_name} train {train_seed} split {split_seed}")
        model, info = ensure_checkpoint(task_name, scale, train_seed, checkpoint_dir, device,
                                        progress)
        accuracy = task_accuracy(info, task_name)  # per task on a shared (multitask) model
        if accuracy < MIN_ACCURACY:
            excluded[(task_name, train_seed)] = accuracy
            print(f"excluded: {task_name} training seed {train_seed}, held-out accuracy "
                  f"{accuracy:.3f} < 0.95", file=sys.stderr)
            continue
        # timing repeats on each model's first split
        timed = split_seed == split_seeds(task_name, train_seed, settings)[0]
        r = run_one(task_for(task_name, scale), model, settings, split_seed,
                    device, timing_repeats=settings["repeats"] if timed else 0,
                    train_seed=train_seed)
        r.update(train_seed=train_seed,
                 split_index=split_seeds(task_name, train_seed, settings).index(split_seed),
                 model=dict(model_record(info), weights_sha256=info["weights_sha256"]),
                 # each shard says where it came from (docs/protocol.md v4, "Output")
                 environment=environment, settings=settings, scale=scale,
                 protocol=PROTOCOL_VERSION)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_shard(path, r)
        ran += 1
    return ran, excluded


def run(tasks, *, quick=False, device=None, out_dir="results/attribution", progress=True,
        checkpoint_dir=None, with_realistic=True, settings=None, threads=1, train_seeds=None,
        distributed=None, report_only=False):
    """Runs (or resumes) the benchmark; writes results.json / results.md / plots.

    Under torch.distributed (``distributed`` as in ``steerops.patching_sweep``) the
    task models (each with its split seeds) are spread over the ranks, each on its own
    device (``device=None``: cuda:LOCAL_RANK, else the CPU); every rank writes its
    runs' shards, then every rank aggregates all of them and rank 0 alone writes the
    results, runs the realistic stage and draws the plots."""
    if not tasks:
        raise UsageError("tasks is empty: name at least one task of " + ", ".join(TASKS))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    lock = _lock_output(out_dir, distributed, report_only)
    try:
        return _run(tasks, quick=quick, device=device, out_dir=out_dir, progress=progress,
                    checkpoint_dir=checkpoint_dir, with_realistic=with_realistic,
                    settings=settings, train_seeds=train_seeds, distributed=distributed,
                    report_only=report_only)
    finally:
        lock.__exit__(None, None, None)
        torch.set_num_threads(previous_threads)


def _lock_output(out_dir, distributed, report_only):
    """One run at a time per output folder (timings taken under another run's load
    would be wrong, and both would recompute the same shards): rank 0 takes the
    folder's lock and every rank learns whether it got it. A report reads only."""
    split = dist.active(distributed)
    lock = FolderLock(out_dir) if not report_only and (not split or dist.is_main()) else None
    refused = None
    try:
        if lock is not None:
            lock.__enter__()
    except UsageError as e:
        refused, lock = str(e), None
    if split:
        refused = dist.gather(refused)[0]
    if refused:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise UsageError(refused)
    return lock or contextlib.nullcontext()  # ranks other than 0, and reports


def excluded_model(task_name, train_seed, accuracy, scale, checkpoint_dir):
    """A model the 95% rule left out, as results.json lists it: with how far along its
    chains a multi-hop model got (test accuracy per depth) when its record has it."""
    out = {"task": task_name, "train_seed": train_seed, "held_out_accuracy": accuracy}
    info = checkpoint_info(task_name, scale, train_seed, checkpoint_dir) or {}
    if "depth_accuracy" in info:
        out["depth_accuracy"] = info["depth_accuracy"]
    return out


def _run(tasks, *, quick, device, out_dir, progress, checkpoint_dir, with_realistic, settings,
         train_seeds, distributed, report_only):
    settings = dict(settings or (QUICK if quick else FULL))
    env = environment()  # at the start: the commit the run's code came from
    env["torch_threads"] = torch.get_num_threads()
    split = dist.active(distributed)
    rank, world = dist.rank_world() if split else (0, 1)
    main = rank == 0
    device = torch.device(device) if device is not None else dist.local_device()
    progress = progress and main
    if not report_only:
        os.makedirs(out_dir, exist_ok=True)
    scale = settings["scale"]
    seeds = list(train_seeds if train_seeds is not None else SCALES[scale]["seeds"])
    if scale == "toy":
        seeds = [0]  # one shipped model per task
    # training seed first: an interrupted run has every task at the earlier seeds
    jobs = [(t, s, sp) for s in seeds for t in tasks for sp in split_seeds(t, s, settings)]
    env.update(world_size=world, device_used=str(device))
    results = {"protocol": {"version": PROTOCOL_VERSION, "document": PROTOCOL_DOC},
               "environment": env, "settings": dict(settings, seed=SEED, quick=quick),
               "train_seeds": seeds, "split_seeds": "nested: bench.controls.split_seed(task, "
               "training seed, index), index < settings.split_seeds",
               "checkpoints": checkpoint_dir or ("shipped" if scale == "toy" else
                                                 "shipped where bench/checkpoints/" + scale
                                                 + " has them, else the cache"),
               "complete": False, "stages_done": [], "runs_done": 0, "runs_total": len(jobs),
               # what this run was asked for beside the scale's whole run: a folder of a
               # subset says so (reporting.scope_lines)
               "scope": {"tasks": list(tasks), "train_seeds": seeds,
                         "scale_tasks": scale_tasks(scale),
                         "scale_train_seeds": list(SCALES[scale]["seeds"])}}
    # read before this run rewrites results.json: when --out is the committed folder,
    # the file it overwrites is the record its models are compared with
    committed = committed_hashes(scale)
    started = time.time()
    # one unit per task model (its split seeds together: it is trained or loaded once),
    # costed by its runs still missing, so a resumed run spreads what is left; rank 0's
    # view of the shards is the one every rank uses (no rank writes before this point)
    models = [(t, s) for s in seeds for t in tasks]
    if main:
        # a report reads what was run; a run recomputes on today's model
        set_aside_stale(((shard_path(out_dir, settings, *j),
                          checkpoint_path(model_name(j[0], scale), scale, j[1], checkpoint_dir))
                         for j in jobs), check_weights=not report_only)
    left = [sum(not os.path.exists(shard_path(out_dir, settings, t, s, sp))
                for sp in split_seeds(t, s, settings)) for t, s in models]
    if split:
        left = dist.gather(left)[0]
    mine = {models[u] for u in dist.assign(left, world)[rank]}
    ran, excluded = 0, {}
    if not report_only:
        ran, excluded = _run_jobs([j for j in jobs if j[:2] in mine], settings=settings,
                                  scale=scale, out_dir=out_dir, environment=env,
                                  checkpoint_dir=checkpoint_dir, device=device,
                                  progress=progress)
    if split:
        parts = dist.gather((ran, excluded))
        ran = sum(p[0] for p in parts)
        excluded = {k: v for p in parts for k, v in p[1].items()}
        dist.barrier()
    runs, missing = [], []
    for task_name, train_seed, split_seed in jobs:  # fresh and resumed runs alike
        path = shard_path(out_dir, settings, task_name, train_seed, split_seed)
        if not os.path.exists(path):
            missing.append([task_name, train_seed, split_seed])
            continue
        runs.append(read_shard(path))
    # models this call did not load (--report-only, or another call's): excluded by
    # their recorded accuracy; their runs are not missing, the protocol leaves them out
    for t, s in {(t, s) for t, s, _ in missing} - set(excluded):
        info = checkpoint_info(t, scale, s, checkpoint_dir)
        if info is not None and task_accuracy(info, t) < MIN_ACCURACY:
            excluded[(t, s)] = task_accuracy(info, t)
    missing = [m for m in missing if tuple(m[:2]) not in excluded]
    if not runs and missing and report_only:
        raise UsageError(f"--report-only: no finished runs under {out_dir}/runs for these "
                         f"settings ({scale} scale); run without --report-only first")
    if not runs and missing:
        raise RuntimeError(f"no finished runs under {out_dir}/runs ({len(missing)} missing)")
    results.update(runs_done=len(runs), runs_resumed=len(runs) - ran,
                   run_seconds=round(time.time() - started, 1), partial=bool(missing),
                   missing_runs=missing,
                   runs_excluded=len(jobs) - len(runs) - len(missing),
                   excluded_models=[excluded_model(t, s, a, scale, checkpoint_dir)
                                    for (t, s), a in sorted(excluded.items())])
    if not runs:  # every task model excluded: this scale has no verdict, and says why
        results.update(complete=True, verdict=None)
        table = no_verdict_markdown(results)
        if main:
            save_results(out_dir, "results", results, table)
        return results, table
    # --report-only over a finished run: the run's own record (environment, timings, the
    # measured realistic stage), so results.json comes out as the run wrote it
    record = read_record(out_dir, settings, len(runs)) if report_only else None
    if record:
        results.update({k: record[k] for k in ("environment", "runs_resumed", "run_seconds",
                                               "checkpoints") if k in record})
    results["stages_done"].append("runs")
    if main and not report_only:
        save_results(out_dir, "results", results)
    results.update(summarize(runs, settings["n_boot_hier"], SEED))
    results["models"] = models_seen(runs, scale, committed)
    if record and "model_matches" in record:  # as the run found them, not today's commit
        for m, same in zip(results["models"], record["model_matches"]):
            m["matches"] = same
    import transformers as T_  # the model's shape alone: a report needs no weights
    config = T_.LlamaConfig(**SCALES[scale]["config"])
    T = task_for(tasks[0], scale).seq_len
    results["curves"] = compute_curves(config, T, settings, contrast=min(
        min(r["contrast_positions"]) for r in runs))
    results["break_even"] = break_even_curves(settings)
    results["stages_done"].append("curves")
    results["runs"] = runs
    if not main:
        return results, markdown(results)
    if not report_only:
        save_results(out_dir, "results", compact(results))
    if record and "realistic" in record:
        results["realistic"] = record["realistic"]
        results["stages_done"].append("realistic")
    elif with_realistic:
        results["realistic"] = realistic(settings, device, progress=progress)
        results["stages_done"].append("realistic")
    results["complete"] = True
    results["total_seconds"] = record["total_seconds"] if record else round(
        time.time() - started, 1)
    if not report_only and not results["partial"]:
        write_json(record_path(out_dir, settings), dict(
            {k: results[k] for k in ("environment", "runs_done", "runs_resumed", "run_seconds",
                                     "total_seconds", "checkpoints",
                                     *(("realistic",) if "realistic" in results else ()))},
            model_matches=[m["matches"] for m in results["models"]]))
    table = markdown(results)
    save_results(out_dir, "results", compact(results), table)
    plots(results, out_dir)
    return results, table


def build_parser():
    p = Parser(
        prog="steerops bench attribution",
        description="The attribution benchmark (protocol v4, docs/protocol.md): activation "
                    "patching vs steering-vector attributions against their controls "
                    "(random-direction twins, positional priors), faithfulness and compute, "
                    "per scale (standard: 12 tasks; deep: multi-hop tasks; multitask: one "
                    "model on every task), several training and split seeds.")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS) + list(MULTIHOP),
                   metavar="TASK", help=f"tasks to run (default: the scale's: the 12 "
                                        f"{', '.join(TASKS)}; deep: {', '.join(MULTIHOP)})")
    p.add_argument("--quick", action="store_true",
                   help="toy scale, one split seed, fewer pairs and bootstrap draws (same "
                        "protocol), about two minutes on CPU")
    p.add_argument("--scale", choices=("standard", "deep", "multitask"), default=None,
                   help="the full run's scale: standard (the 12 tasks, 4 layers; default), "
                        "deep (the multi-hop tasks, 6 layers, 48 tokens) or multitask (one "
                        "6-layer model per seed on every task, a task token first)")
    p.add_argument("--device", default=None, type=device,
                   help="torch device (default: cuda:LOCAL_RANK if CUDA is available, else cpu)")
    p.add_argument("--out", default="results/attribution", type=output_folder,
                   help="output folder for results.json, results.md and the plots "
                        "(default: results/attribution)")
    p.add_argument("--checkpoints", default=None, metavar="DIR", type=existing_folder,
                   help="folder of task checkpoints, e.g. from python -m steerops.bench.train "
                        "(default: the shipped toy ones; standard ones are trained on demand "
                        "into $STEEROPS_CACHE or ~/.cache/steerops)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads, set explicitly and recorded (default: 1; two "
                        "threads on a loaded 2-core machine stall and skew the times)")
    p.add_argument("--train-seeds", type=nonnegative_int, nargs="+", default=None,
                   help="standard-scale training seeds (default: 0 1 2)")
    p.add_argument("--no-realistic", action="store_true",
                   help="skip the GPT-2-small / 1B compute measurements")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the runs finished so far under --out (partial)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick and args.scale:
        p.error("--quick runs the toy scale; give --scale without --quick")
    scale = "toy" if args.quick else args.scale or "standard"
    args.tasks = args.tasks or scale_tasks(scale)
    wrong = [t for t in args.tasks if t not in scale_tasks(scale)]
    if wrong:
        p.error(f"--tasks {' '.join(wrong)}: not tasks of the {scale} scale (its tasks: "
                f"{', '.join(scale_tasks(scale))})")
    settings = None if scale in ("toy", "standard") else dict(FULL, scale=scale)
    dist.init_from_env()  # under torchrun: one process group, the work split over its ranks
    results, table = run(args.tasks, quick=args.quick, settings=settings, device=args.device,
                         out_dir=args.out, progress=not args.no_progress,
                         checkpoint_dir=args.checkpoints,
                         with_realistic=not args.no_realistic, threads=args.threads,
                         train_seeds=args.train_seeds, report_only=args.report_only)
    if not dist.is_main():
        return 0
    print(table)
    if not results["runs_done"]:
        print(f"\nwrote {args.out}/results.json, results.md (no verdict: every task model "
              f"excluded)", file=sys.stderr)
        return 0
    print(f"\nwrote {args.out}/results.json, results.md, plane.png, answer_column_share.png, "
          f"break_even.png, plane_v3.png, cap_curves.png, compute_ratio.png, "
          f"heatmaps/TASK.png, TASK-pair.png (runs resumable under {args.out}/runs)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
