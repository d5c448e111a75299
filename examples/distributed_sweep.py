"""A patching sweep spread over every process torchrun starts (one per GPU, or CPU
processes with gloo), gathered so that every rank holds the whole result.

    torchrun --nproc-per-node 2 examples/distributed_sweep.py --pairs 4 --tokens 16
    torchrun --nproc-per-node 8 examples/distributed_sweep.py --model meta-llama/Llama-3.1-8B \\
        --pairs 16 --tokens 64 --shards sweep_shards     # resumable: rerun after a failure

Without --model it sweeps a randomly initialised GPT-2-small (no download). Rank 0
prints the time and writes the effects to --out.
"""
import argparse
import json
import time

import torch

import steerops
from steerops.sweeps import distributed as D


def main(argv=None):
    p = argparse.ArgumentParser(prog="distributed_sweep",
                                description="A patching sweep over torch.distributed ranks.")
    p.add_argument("--model", default=None,
                   help="a Hugging Face model name or path (default: random GPT-2-small)")
    p.add_argument("--pairs", type=int, default=4, help="prompt pairs (default 4)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per prompt (default 16)")
    p.add_argument("--pairs-per-unit", type=int, default=None,
                   help="pairs per work unit (default: all; a unit is those pairs x one layer)")
    p.add_argument("--shards", default=None, help="folder for finished units (resumable)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--out", default="sweep_effects.json", help="rank 0 writes effects here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    import os
    if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        # under torchrun, even with one process: the same unit path at every world size
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = D.local_device()
    import transformers as T
    torch.manual_seed(0)  # same random model and prompts on every rank
    if args.model is None:
        model = T.GPT2LMHeadModel(T.GPT2Config())
    else:
        model = T.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    model = model.to(device).eval()
    V = model.config.vocab_size
    clean = torch.randint(0, V, (args.pairs, args.tokens))
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % V
    metric = steerops.logit_diff(torch.zeros(args.pairs, dtype=torch.long),
                                 torch.ones(args.pairs, dtype=torch.long))
    D.barrier()
    t0 = time.perf_counter()
    result = steerops.patching_sweep(model, clean, corrupt, metric, shard_dir=args.shards,
                                     pairs_per_unit=args.pairs_per_unit,
                                     distributed=torch.distributed.is_initialized())
    seconds = time.perf_counter() - t0
    rank, world = D.rank_world()
    if rank == 0:
        info = {"world": world, "seconds": round(seconds, 3), "pairs": args.pairs,
                "tokens": args.tokens, "threads_per_process": args.threads,
                "units": result.extra.get("units"), "effects": result.effects.tolist()}
        with open(args.out, "w") as f:
            json.dump(info, f)
        print(f"{world} process(es): {seconds:.2f} s for {args.pairs} pairs x "
              f"{result.effects.numel()} sites")


if __name__ == "__main__":
    main()
