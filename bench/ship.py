"""Ships trained task models with the repository (docs/protocol.md, "Reproducible
models"): training on pinned CPU math paths is bit-exact on one kind of CPU but not
across kinds (an Intel Xeon and an AMD EPYC give different weights), so the models a
committed result came from are stored in bench/checkpoints/SCALE as fp16 files. The
stored weights are then the models: their held-out accuracy is measured again on them,
and the benchmark loads them (checkpoint_path prefers them to the cache) and records
their sha256.

    python -m steerops.bench.ship --scale deep            # every cached model of the scale
    python -m steerops.bench.ship --scale deep --tasks pointer --seeds 0
"""
import json
import os
import sys

import torch

from steerops.app.cli_args import Parser, existing_folder, nonnegative_int

from .model_store import (build_model, cache_dir, checkpoint_name, read_info, shipped_dir,
                          weights_sha256)
from .scales import SCALES, model_name, scale_tasks, task_for
from .train import depth_record, shared_task_accuracy
from .trainer import TEST_SEED, accuracy

STORED_DTYPE = torch.float16


def ship(source, target, scale):
    """Writes ``source`` (a trained float32 checkpoint) to ``target`` in fp16, its record
    saying what it was trained as and what the stored weights score. Returns the record."""
    from safetensors.torch import load_file, save_file
    info = read_info(source)
    state = {k: v.to(STORED_DTYPE).contiguous() for k, v in load_file(source).items()}
    model = build_model(info["config"])
    model.load_state_dict(state)  # the stored weights, back in float32: what runs
    model.eval()
    seed = info["seed"]
    shipped = dict(info, stored_dtype=str(STORED_DTYPE).replace("torch.", ""),
                   trained_sha256=weights_sha256(source),
                   trained_held_out_accuracy=info["held_out_accuracy"])
    # the accuracy the protocol's 95% rule reads, measured as training measured it
    name = info["task"]
    if SCALES[scale].get("shared"):
        shipped["trained_task_accuracy"] = info.get("task_accuracy")
        shipped["task_accuracy"] = shared_task_accuracy(model, scale, seed)
        name = "multitask"
    shipped["held_out_accuracy"] = accuracy(model, task_for(name, scale), 2000,
                                            TEST_SEED + seed)
    shipped.update(depth_record(model, name, scale, seed))  # on the stored weights
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    save_file(state, tmp, metadata={"steerops": json.dumps(shipped)})
    os.replace(tmp, target)
    return shipped


def main(argv=None):
    p = Parser(prog="python -m steerops.bench.ship",
               description="Store trained task models in the repository (fp16) so that the "
                           "committed results can be recomputed on any machine.")
    p.add_argument("--scale", required=True, choices=[s for s in SCALES if s != "toy"])
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="tasks (default: every task of the scale)")
    p.add_argument("--seeds", nargs="+", type=nonnegative_int, default=None,
                   help="training seeds (default: the scale's)")
    p.add_argument("--from", dest="source", type=existing_folder, default=None,
                   help=f"folder of trained checkpoints (default: the cache, {cache_dir()})")
    args = p.parse_args(argv)
    names = sorted({model_name(t, args.scale) for t in (args.tasks or scale_tasks(args.scale))})
    wrong = [t for t in args.tasks or () if t not in scale_tasks(args.scale)]
    if wrong:
        p.error(f"--tasks {' '.join(wrong)}: not tasks of the {args.scale} scale")
    torch.set_num_threads(1)
    source_dir = args.source or cache_dir()
    shipped = 0
    for seed in args.seeds if args.seeds is not None else SCALES[args.scale]["seeds"]:
        for name in names:
            file = checkpoint_name(name, args.scale, seed)
            source = os.path.join(source_dir, file)
            if not os.path.exists(source):
                print(f"{name} seed {seed}: not trained yet ({source})", file=sys.stderr)
                continue
            info = ship(source, os.path.join(shipped_dir(args.scale), file), args.scale)
            shipped += 1
            print(f"{name:18s} seed {seed}: held-out accuracy {info['held_out_accuracy']:.4f} "
                  f"stored (trained {info['trained_held_out_accuracy']:.4f}) -> "
                  f"{os.path.join(shipped_dir(args.scale), file)}")
    if not shipped:
        raise SystemExit(f"nothing to ship: no trained {args.scale} model in {source_dir}")


if __name__ == "__main__":
    main()
