"""Analytic FLOPs of forwards and patching sweeps (2 x multiply-adds), from a model's
config: what a sweep costs in each form (naive-batched, prefix-reuse, the floor),
before it runs. The benchmark checks these against FlopCounterMode."""


def analytic_forward_flops(config, tokens, lm_head=True):
    """2 x multiply-adds of one forward over ``tokens`` positions of one sequence.

    Llama/Mistral-style (q, k, v, o projections, gated MLP) or GPT-2 style
    (fused qkv, 4x MLP); attention scores and the weighted sum included.
    """
    T = tokens
    d = getattr(config, "hidden_size", None) or config.n_embd
    L = getattr(config, "num_hidden_layers", None) or config.n_layer
    V = config.vocab_size
    if getattr(config, "model_type", "") == "gpt2":
        inter = config.n_inner or 4 * d
        per_layer = 2 * T * d * (3 * d) + 2 * T * d * d + 2 * (2 * T * d * inter)
    else:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", heads) or heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        inter = config.intermediate_size
        per_layer = (2 * T * d * (heads * head_dim) + 2 * 2 * T * d * (kv * head_dim)
                     + 2 * T * (heads * head_dim) * d + 3 * 2 * T * d * inter)
    attention = 2 * 2 * T * T * d
    flops = L * (per_layer + attention)
    if lm_head:
        flops += 2 * T * d * V
    return flops


def _dims(config):
    d = getattr(config, "hidden_size", None) or config.n_embd
    L = getattr(config, "num_hidden_layers", None) or config.n_layer
    return d, L, config.vocab_size


def token_layer_flops(config, context):
    """FLOPs of one token through one block, attending over ``context`` tokens."""
    d, L, _ = _dims(config)
    return analytic_forward_flops(config, context, lm_head=False) / (L * context)


def reuse_sweep_flops(config, report, pairs, T):
    """Analytic FLOPs of a patching sweep with reuse, from its report: the two
    base runs, the token-layers the patched forwards ran (attention priced at the
    full context, an upper bound) and the LM-head tokens."""
    d, _, V = _dims(config)
    base = 2 * pairs * analytic_forward_flops(config, T)
    return (base + report["token_layers_run"] * token_layer_flops(config, T)
            + report["head_tokens"] * 2 * d * V)


def site_floor_flops(config, T, sites):
    """One pair's intervened runs in the cheapest correct form: per site (l, p),
    (L - l) blocks over the T - p tokens from p on (the rest is the corrupt run's,
    from its KV cache) and the LM head at the answer position only."""
    d, L, V = _dims(config)
    per = token_layer_flops(config, T)
    return sum((L - l) * (T - p) * per + 2 * d * V for l, p in sites)


def patching_forms_flops(config, T, pairs, sites):
    """Analytic FLOPs of the three forms docs/protocol.md asks to report, for ``sites``
    (the (l, p) whose patch differs from the base run), each with the two base runs:
    naive-batched (a full forward with head per site), prefix-reuse (positions >= p
    through every block, the head at the answer) and the floor (only blocks l+1..L)."""
    d, L, V = _dims(config)
    per = token_layer_flops(config, T)
    base = 2 * analytic_forward_flops(config, T)
    naive = base + len(sites) * analytic_forward_flops(config, T)
    prefix = base + sum(L * (T - p) * per + 2 * d * V for _, p in sites)
    return {"naive_batched": pairs * naive, "prefix_reuse": pairs * prefix,
            "floor": pairs * (base + site_floor_flops(config, T, sites))}


def patching_floor_flops(config, T, pairs, first_diff=0):
    """docs/protocol.md's cheapest correct patching: two base runs, then per pair and
    site (l, p) with p >= the first differing position, the site's floor."""
    _, L, _ = _dims(config)
    sites = [(l, p) for l in range(L + 1) for p in range(first_diff, T)]
    return 2 * pairs * analytic_forward_flops(config, T) + pairs * site_floor_flops(config, T,
                                                                                     sites)
