"""The training loop of the benchmark's task models: a ``TrainingPlan`` (what one model's
training is) and ``train_task`` (run it, resumably). The scales and their recipes live in
bench/scales.py.

The loss is on the answer token only; clean and corrupt prompts are both task instances.
Held-out accuracy is checked every ``eval_every`` steps on prompts from a separate
generator stream, and the final accuracy on a third.
"""
import dataclasses
import os
import time

import torch

from . import reproducible as R
from .curriculum import Curriculum, rows
from .model_store import MODEL_CONFIG, build_model

TRAIN_SEED, EVAL_SEED, TEST_SEED = 0, 10_000, 20_000
# Subnormal floats appear as these models train and slow a CPU step 3x (induction: 2.1
# steps/s at step 100, 0.7 at step 800); flushing them to zero keeps the step time flat.
FLUSH_DENORMAL = True  # bump when the config, tasks or training recipe change


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """One model's training. ``decay``: after the 100 warm-up steps the learning rate falls
    linearly to 10% at ``max_steps`` (the standard scale: a constant rate left models
    oscillating a few points under the target until the budget ran out); "last-stage":
    it stays constant through a curriculum's stages and falls from the step every track
    reached its last stage (the deep runs: a rate falling from step 0 left the later
    stages, which take longest, a fraction of it). ``seeded_init``:
    the benchmark's own initialisation (bench/reproducible.py) instead of the library's.
    ``curriculum``: None, or "hop-stages" (multi-hop tasks: one stage per lookup depth,
    bench.multihop.hop_stages; evaluation and the target stay at h). ``multihop_share``:
    on a shared model, the share of the rows the multi-hop tasks draw between them (the
    curriculum given to train_task applies it; recorded here). ``compiled``: the training
    step runs through torch.compile (the deep and multitask scales: bench/scales.py)."""
    seed: int = 0
    max_steps: int = 6000
    batch_pairs: int = 128
    lr: float = 3e-3
    target: float = 0.99
    eval_every: int = 250
    config: dict = None
    decay: object = False  # False, True or "last-stage"
    seeded_init: bool = False
    curriculum: str = None
    multihop_share: float = None
    compiled: bool = False

    def record(self):
        """What a checkpoint records of its plan (and what a resumed state must match)."""
        out = dataclasses.asdict(self)
        out["config"] = self.config or MODEL_CONFIG
        # plans from before these settings stay what they were
        if self.multihop_share is None:
            del out["multihop_share"]
        if not self.compiled:
            del out["compiled"]
        return out


def resume_identity(plan, task):
    """What a resumable state is saved under (a state under another is set aside)."""
    return dict(plan.record(), task=task.name, seq_len=task.seq_len)


@torch.no_grad()
def accuracy(model, task, n_pairs, seed):
    model.eval()
    # one group per prompt length (a shared model's tasks); the hits pooled over all rows
    hits = [model(ids).logits[:, -1].argmax(-1) == labels for ids, labels in
            map(rows, task.sample_groups(n_pairs, torch.Generator().manual_seed(seed)))]
    return float(torch.cat(hits).float().mean())


def train_task(task, *, progress=True, resume_path=None, stages=None, **plan):
    """Trains a model on ``task`` under ``TrainingPlan(**plan)``; returns (model, record).
    ``stages``: a curriculum (bench/curriculum.py), or one track of it, [(training task,
    gate task)]: batches come from the current stages' training tasks, and a stage ends at
    the evaluation where its gate task's held-out accuracy reaches STAGE_GATE (a last
    stage runs to the target or the budget); without it, batches come from ``task``.
    Accuracy and the target are always on ``task``. ``resume_path``: the whole training
    state (the stages included) is saved there at every evaluation and a run finding it
    continues from it (removed at the end); a state saved under another plan is set
    aside, not continued."""
    plan = TrainingPlan(**plan)
    if not isinstance(stages, Curriculum):
        stages = Curriculum.single(task, stages)
    torch.set_flush_denormal(FLUSH_DENORMAL)
    try:
        return _train(task, stages, plan, progress, resume_path)
    finally:
        torch.set_flush_denormal(False)  # the default: later work in the process unchanged


def _on_this_machine(machines, step):
    """The machines a training has run on, this one added from ``step`` when it differs
    from the last: training, pinned or not, is bit-exact on one kind of CPU only, so a
    model carried to another kind says where it changed."""
    here = {k: v for k, v in R.math_paths().items() if k in ("cpu", "cpu_capability")}
    if machines and {k: machines[-1].get(k) for k in here} == here:
        return machines
    return machines + [dict(here, from_step=step)]


def _compiled(model):
    """``model``'s forward through torch.compile, for the training step. It shares the
    model's parameters (evaluation and the saved state use the model itself). The rows
    of a group vary (a shared model's tasks), its lengths are few (a curriculum's
    stages): the batch dimension is dynamic, the length static, one graph per length
    (compiled with a dynamic length, inductor's CPU code corrupted the heap: torch 2.13,
    a 6-layer model at 12 tokens)."""
    import torch._dynamo
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))  # the multitask stages: ~17 lengths
    compiled = torch.compile(model)

    def forward(ids):
        if ids.shape[0] > 1:
            torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_static(ids, 1)
        return compiled(ids)
    return forward


def _train(task, stages, plan, progress, resume_path):
    from tqdm.auto import tqdm
    torch.manual_seed(plan.seed)
    model = build_model(plan.config or MODEL_CONFIG)
    if plan.seeded_init:
        R.seeded_init(model, plan.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.01)
    forward = _compiled(model) if plan.compiled else model

    def schedule(s):
        warm = min(1.0, (s + 1) / 100)
        start = stages.last_stage_since() if plan.decay == "last-stage" else 0
        if not plan.decay or start is None:
            return warm
        return warm * max(0.1, 1 - (s - start) / max(1, plan.max_steps - start))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(TRAIN_SEED + plan.seed)
    step, held_out, before = 0, 0.0, 0.0
    parts = dict(model=model, opt=opt, sched=sched, gen=gen)
    identity = resume_identity(plan, task)
    machines = []
    if resume_path and os.path.exists(resume_path):
        step, held_out, before, where, machines = R.load_state(
            resume_path, plan=identity, extra=stages.state(), **parts)
        stages.load(where)
    machines = _on_this_machine(machines, step)
    t0 = time.time() - before
    bar = tqdm(total=plan.max_steps, initial=step, disable=not progress,
               desc=f"train {task.name}", leave=False)
    while step < plan.max_steps and not (step and held_out >= plan.target):
        model.train()
        groups = stages.batch(plan.batch_pairs, gen)
        rows = sum(len(labels) for _, labels in groups)
        # each length's mean loss weighted by its rows: the mean over the batch (one group:
        # exactly plain training's loss)
        loss = sum(torch.nn.functional.cross_entropy(forward(ids).logits[:, -1], labels)
                   * (len(labels) / rows) for ids, labels in groups)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % plan.eval_every == 0:
            held_out = accuracy(model, task, 500, EVAL_SEED + plan.seed)
            stages.advance(step, lambda gate: accuracy(model, gate, 500, EVAL_SEED + plan.seed))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{held_out:.3f}",
                            **stages.progress())
            if resume_path:
                R.save_state(resume_path, step=step, held_out=held_out,
                             elapsed=time.time() - t0, plan=identity, extra=stages.state(),
                             machines=machines, **parts)
    bar.close()
    test = accuracy(model, task, 2000, TEST_SEED + plan.seed)
    if resume_path and os.path.exists(resume_path):
        os.remove(resume_path)
    record = {k: v for k, v in plan.record().items() if k != "eval_every"}
    if plan.curriculum:  # when each stage began
        record["stage_steps"] = stages.state()["stage_steps"]
    else:
        del record["curriculum"]  # records from before curricula stay comparable
    if len(machines) > 1:  # carried between machines (bench/training_carry.py)
        record["machines"] = machines
    return model.eval(), dict(record, task=task.name, steps=step, held_out_accuracy=test,
                              flush_denormal=FLUSH_DENORMAL, seq_len=task.seq_len,
                              threads=torch.get_num_threads(), math_paths=R.math_paths(),
                              train_seconds=round(time.time() - t0, 1))
