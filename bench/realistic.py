"""Compute at sizes beyond the task models (docs/protocol.md v3): every method priced
by ``bench.pricing``'s rules at GPT-2-small and a ~1B Llama config with the
benchmark's pair counts, and on GPT-2-small measured stage by stage (time, peak
memory, FlopCounterMode) by running the benchmark's own run on random pairs, the
same pair count on every stage of both sides. Plus the analytic ratio against |S|.
"""
from types import SimpleNamespace

import torch

from . import pricing as P
from .compute import meta_forward_flops
from .tasks import Pairs

T_REALISTIC, CONTRAST = 24, 8  # the standard layout's shape: 16 positions from p* on


def _layers(cfg):
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layer


def configs():
    import transformers as Tf
    return {
        "gpt2-small": Tf.GPT2Config(),
        "llama-1.1b": Tf.LlamaConfig(hidden_size=2048, intermediate_size=5632,
                                     num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, vocab_size=32000),
    }


def priced(cfg, T, contrast, n_fit, n_val, n_eval, s2_steps):
    """Every method's FLOPs and ratios for a model of config ``cfg`` whose prompts
    differ at column ``contrast``: S* = layers 1..L-1 at positions contrast..T-1 (every
    one differing), the S2 layer in the middle."""
    L = _layers(cfg)
    star = [(l, p) for l in range(1, L) for p in range(contrast, T)]
    stages = P.run_stages(cfg, T, n_fit=n_fit, n_val=n_val, n_eval=n_eval,
                          val_contrast=[contrast] * n_val, star_sites=star,
                          grid=(0,) * 6, s2_steps=s2_steps, s2_layer=L // 2)
    forms = P.patching_forms(cfg, T, [star] * n_eval, (L + 1) * T)
    return {"star_sites": len(star), "stage_flops": stages, "patching_flops": forms,
            "methods": P.method_costs(stages, forms)}


def random_splits(vocab, n, T, contrast, seed):
    """D_fit / D_val / D_eval of random prompts differing at ``contrast`` (timing only:
    a randomly initialised model's attributions mean nothing)."""
    gen = torch.Generator().manual_seed(seed)

    def pairs():
        clean = torch.randint(0, vocab, (n, T), generator=gen)
        corrupt = clean.clone()
        corrupt[:, contrast] = (clean[:, contrast] + 1) % vocab
        answer = torch.randint(0, vocab, (n,), generator=gen)
        return Pairs(clean, corrupt, answer, (answer + 1) % vocab, torch.full((n,), contrast))
    return {"fit": pairs(), "val": pairs(), "eval": pairs()}


def measured(name, cfg, settings, device, pairs, T=T_REALISTIC, contrast=CONTRAST):
    """The benchmark's run (bench.evaluate.run_one) on a randomly initialised model of
    ``cfg`` with ``pairs`` pairs in every split: per method its time, counted FLOPs and
    peak memory against patching's, and per stage."""
    import transformers as Tf

    from .evaluate import run_one
    torch.manual_seed(0)
    model = Tf.AutoModelForCausalLM.from_config(cfg).to(device).eval()
    task = SimpleNamespace(name=name, seq_len=T, binary=False)
    run = run_one(task, model, dict(settings, n_boot=2), 0, device,
                  timing_repeats=settings["repeats"],
                  splits=random_splits(cfg.vocab_size, pairs, T, contrast, 0))
    del model
    costs = run["compute"]["costs"]
    return {"pairs": pairs, "device": str(device), "repeats": settings["repeats"],
            "methods": {m: dict({k: c.get(k) for k in ("ratio_seconds", "ratio_counted_flops",
                                                       "seconds", "peak_memory_mb")},
                                # priced by the rules at these pair counts (beside the times)
                                ratio_floor=(c.get("ratio") or {}).get("floor"))
                        for m, c in costs.items()},
            "stages": [{k: s[k] for k in ("name", "seconds", "seconds_q1", "seconds_q3",
                                          "counted_flops", "analytic_flops", "floor_flops",
                                          "peak_memory_mb")}
                       for s in run["compute"]["stages"]]}


def realistic(settings, device, progress=True, T=T_REALISTIC, contrast=CONTRAST):
    """Every method priced at GPT-2-small and a ~1.1B Llama with the benchmark's pair
    counts; measured on GPT-2-small (and on the 1.1B model on a GPU) with
    ``realistic_pairs`` / ``realistic_pairs_1b`` pairs (0: not measured)."""
    import transformers as Tf
    out = {"tokens": T, "contrast": contrast}
    pairs = {"gpt2-small": settings["realistic_pairs"],
             "llama-1.1b": settings.get("realistic_pairs_1b", 0)}
    for name, cfg in configs().items():
        entry = priced(cfg, T, contrast, settings["n_fit"], settings["n_val"],
                       settings["n_eval"], settings["s2_steps"])
        entry["forward_flops_meta"] = meta_forward_flops(
            lambda cfg=cfg: Tf.AutoModelForCausalLM.from_config(cfg), T)
        entry["analytic_forward_flops"] = P.cache_forward(cfg, T) + T * P.head_flops(cfg)
        entry["measured"] = None
        # the ~1B model on a CPU: FLOPs only (its sweep alone runs for hours on 1 thread)
        if pairs[name] > 0 and (name == "gpt2-small" or torch.device(device).type == "cuda"):
            entry["measured"] = measured(name, cfg, settings, device, pairs[name], T, contrast)
        out[name] = entry
    return out


def compute_curves(config, T, settings, contrast):
    """Analytic ratio (counted, against the floor) of each method against |S*| (the
    model's shape at longer prompts, p* a third of the way in) and against the number
    of eval pairs (the benchmark's T and p*)."""
    curves = {"sites": [], "tokens": [], "pairs": [8, 16, 32, 64, 128, 256], "by_sites": {},
              "by_pairs": {}}
    for tokens in (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        p = priced(config, tokens, tokens // 3, settings["n_fit"], settings["n_val"],
                   settings["n_eval"], settings["s2_steps"])
        curves["sites"].append(p["star_sites"])
        curves["tokens"].append(tokens)
        for m, c in p["methods"].items():
            curves["by_sites"].setdefault(m, []).append(c["ratio"]["floor"])
    for n in curves["pairs"]:
        p = priced(config, T, contrast, settings["n_fit"], settings["n_val"], n,
                   settings["s2_steps"])
        for m, c in p["methods"].items():
            curves["by_pairs"].setdefault(m, []).append(c["ratio"]["floor"])
    return curves


BREAK_EVEN_LAYERS = (2, 4, 8, 12, 24, 48)
BREAK_EVEN_TOKENS = (12, 24, 48, 96, 192)


def break_even_curves(settings, layers=BREAK_EVEN_LAYERS, tokens=BREAK_EVEN_TOKENS):
    """Each method's counted ratio against each form of patching as a function of the
    depth L (GPT-2-small's width, T = 24) and of the prompt length T (GPT-2-small, p* a
    third of the way in): where "about 4%" holds, and for which reading."""
    import transformers as Tf
    out = {"layers": list(layers), "tokens": list(tokens), "by_layers": {}, "by_tokens": {}}
    for L in layers:
        p = priced(Tf.GPT2Config(n_layer=L), T_REALISTIC, CONTRAST, settings["n_fit"],
                   settings["n_val"], settings["n_eval"], settings["s2_steps"])
        for m, c in p["methods"].items():
            for form, ratio in c["ratio"].items():
                out["by_layers"].setdefault(m, {}).setdefault(form, []).append(ratio)
    for T in tokens:
        p = priced(Tf.GPT2Config(), T, T // 3, settings["n_fit"], settings["n_val"],
                   settings["n_eval"], settings["s2_steps"])
        for m, c in p["methods"].items():
            for form, ratio in c["ratio"].items():
                out["by_tokens"].setdefault(m, {}).setdefault(form, []).append(ratio)
    return out
