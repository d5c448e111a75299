"""The reproducibility check that CI runs at both ends of the supported transformers
range: a small task model trained the standard scale's way (seeded initialisation,
pinned CPU math paths, one thread) and the sha256 of its weights.

    python -m steerops.bench.repro_check      # prints the digest (re-runs itself pinned)
"""
import hashlib
import subprocess
import sys

from . import reproducible as R

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def weights_digest(model):
    """sha256 over the weights alone (names and bytes in sorted order; the checkpoint
    file also holds metadata such as the wall time)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_small(steps=30):
    from .spread import VOCAB_STANDARD, task_at
    from .scales import STANDARD_CONFIG
    from .trainer import train_task
    config = dict(STANDARD_CONFIG, **SMALL, vocab_size=VOCAB_STANDARD)
    model, _ = train_task(task_at("sorting", 24), seed=0, max_steps=steps, batch_pairs=16,
                          eval_every=10_000, target=2.0, progress=False, config=config,
                          decay=True, seeded_init=True)
    return model


def pinned_digest(steps=30):
    """The digest, computed in a pinned child process."""
    argv, env = R.pinned_command(["steerops.bench.repro_check", "--steps", str(steps)])
    return subprocess.run(argv, env=env, check=True, capture_output=True,
                          text=True).stdout.split()[-1]


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 30
    if not R.is_pinned():
        print(pinned_digest(steps))
        return 0
    import torch
    torch.set_num_threads(1)
    print(weights_digest(train_small(steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
