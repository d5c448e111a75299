"""Site kinds beyond the residual stream (steerops.model.sites): attention heads, attention
and MLP outputs, resid_mid, neurons. Every kind against an independent reference
written here with plain hooks on named modules: caching, the plain patching sweep
(one site per forward) and AtP (autograd through the hooks), on every family."""
import pytest
import torch
import transformers

import steerops
from hf_models import CAUSAL, causal_lm, prompts
from steerops.model.blocks import find_layers

ARCHS = list(CAUSAL)
COMPONENTS = ("resid_mid", "attn_out", "mlp_out", "head_out")

# Where each kind lives, per family, named independently of steerops.model.sites:
# (path inside the block, "input" or "output"). resid_mid is written below.
ATTN = {"gpt2": "attn", "gpt_neox": "attention"}
OUT_PROJ = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}
DOWN = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}


def _where(arch, kind):
    attn = ATTN.get(arch, "self_attn")
    sandwich = arch == "gemma2"
    return {"attn_out": ("post_attention_layernorm" if sandwich else attn, "output"),
            "mlp_out": ("post_feedforward_layernorm" if sandwich else "mlp", "output"),
            "head_out": (OUT_PROJ.get(arch, f"{attn}.o_proj"), "input"),
            "neuron": (DOWN.get(arch, "mlp.down_proj"), "input")}[kind]


def _module(block, path):
    for name in path.split("."):
        block = getattr(block, name)
    return block


def _hook(model, arch, kind, block, fn):
    """fn(activation) -> activation at ``kind`` in ``block`` (plain torch hooks)."""
    blk = find_layers(model)[block]
    if kind == "resid_mid":  # block input + attention's contribution
        seen = {}

        def pre(mod, args, kwargs):
            seen["r"] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, out):
            o = out[0] if isinstance(out, tuple) else out
            new_o = fn(seen["r"] + o) - seen["r"]
            return (new_o,) + tuple(out[1:]) if isinstance(out, tuple) else new_o
        path, _ = _where(arch, "attn_out")
        return [blk.register_forward_pre_hook(pre, with_kwargs=True),
                _module(blk, path).register_forward_hook(post)]
    path, where = _where(arch, kind)
    module = _module(blk, path)
    if where == "input":
        def pre_fn(mod, args):
            return (fn(args[0]),) + tuple(args[1:])
        return [module.register_forward_pre_hook(pre_fn)]

    def post_fn(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)
    return [module.register_forward_hook(post_fn)]


def _run(model, ids, hooks):
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in hooks:
            h.remove()


def _capture(model, arch, kind, ids):
    L = len(find_layers(model))
    store = {}

    def keep(b):
        def fn(a):
            store[b] = a.detach().clone()
            return a
        return fn
    logits = _run(model, ids, [h for b in range(L) for h in _hook(model, arch, kind, b,
                                                                   keep(b))])
    return store, logits


def _metric(logits, index=None):
    return logits[:, -1, 3] - logits[:, -1, 5]


# transformers 4.x's GPT-2 cannot build its attention mask in float64 over a KV-cache
# prefix ("value cannot be converted to type float without overflow"): float32 there
FP32 = {"gpt2"} if int(transformers.__version__.split(".")[0]) < 5 else set()


def _tol(arch):
    return dict(atol=2e-5, rtol=1e-4) if arch in FP32 else dict(atol=1e-6, rtol=1e-6)


def _case(arch, pairs=2, T=5):
    model = causal_lm(arch)
    model = model if arch in FP32 else model.double()
    clean = prompts(pairs, T, seed=3)
    corrupt = prompts(pairs, T, seed=4)
    corrupt[:, 0] = clean[:, 0]  # position 0 identical: those sites change nothing
    return model, clean, corrupt


def _heads(model):
    return model.config.num_attention_heads


def _loop_effects(model, arch, kind, clean, corrupt, per_position=True, noising=False):
    """One site per forward: the reference sweep, normalised as patching_sweep."""
    source, target = (corrupt, clean) if noising else (clean, corrupt)
    store, source_logits = _capture(model, arch, kind, source)
    base = _run(model, target, [])
    m_source, m_target = _metric(source_logits), _metric(base)
    L, (pairs, T) = len(find_layers(model)), clean.shape
    H = _heads(model) if kind == "head_out" else 1
    raw = torch.empty(pairs, L, T if per_position else 1, H, dtype=torch.float64)
    for i in range(pairs):
        for b in range(L):
            for p in (range(T) if per_position else [None]):
                for h in range(H):
                    def write(a, i=i, b=b, p=p, h=h):
                        a = a.clone()
                        w = a.shape[-1] // H
                        cols = slice(h * w, (h + 1) * w)
                        rows = slice(None) if p is None else slice(p, p + 1)
                        a[0, rows, cols] = store[b][i, rows, cols]
                        return a
                    logits = _run(model, target[i:i + 1], _hook(model, arch, kind, b, write))
                    raw[i, b, 0 if p is None else p, h] = _metric(logits)[0]
    clean_m, corrupt_m = (m_target, m_source) if noising else (m_source, m_target)
    denom = clean_m.mean() - corrupt_m.mean()
    effects = (clean_m.mean() - raw.mean(0)) / denom if noising else \
        (raw.mean(0) - corrupt_m.mean()) / denom
    if kind == "head_out":
        return effects.transpose(-1, -2) if per_position else effects[:, 0]
    return effects[..., 0]


def _kinds(arch):
    return [k for k in COMPONENTS if not (k == "resid_mid" and arch == "gpt_neox")]


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_every_kind_equals_one_site_per_forward(arch):
    """Both forms: the plain batched sweep and the reuse form at the floor."""
    model, clean, corrupt = _case(arch)
    for kind in _kinds(arch):
        expected = _loop_effects(model, arch, kind, clean, corrupt)
        for form in ("none", "full"):
            r = steerops.patching_sweep(model, clean, corrupt, _metric, sites=kind,
                                        batch_size=7, reuse=form, progress=False)
            assert r.effects.shape == expected.shape, kind
            torch.testing.assert_close(r.effects.double(), expected.double(), **_tol(arch),
                                       msg=f"{arch} {kind} {form}")
            assert r.sites == kind and r.extra["plan"]["form"] == form
            # position 0 is the same token in both runs: nothing changes there
            zero = r.effects[..., 0] if kind != "head_out" else r.effects[:, :, 0]
            assert zero.abs().max() < (1e-5 if arch in FP32 else 1e-9), (arch, kind)
        # the reuse form skipped the identical sites (position 0 of each pair)
        units = _heads(model) if kind == "head_out" else 1
        assert r.extra["reuse"]["identical_sites_skipped"] == 2 * 3 * units


@pytest.mark.parametrize("arch", ARCHS)
def test_reuse_forms_equal_the_plain_form_for_every_kind(arch):
    """Denoising and noising, heads by position and at every position, a pair whose
    first differing token comes later, odd batch sizes: prefix and full reuse equal the
    plain sweep."""
    model, clean, corrupt = _case(arch, pairs=3, T=6)
    corrupt[1, :4] = clean[1, :4]
    for kind in _kinds(arch):
        for per_position in ([True, False] if kind == "head_out" else [True]):
            for noising in (False, True):
                args = dict(sites=kind, per_position=per_position, noising=noising,
                            progress=False)
                plain = steerops.patching_sweep(model, clean, corrupt, _metric, reuse="none",
                                                **args)
                for form in ("prefix", "full"):
                    r = steerops.patching_sweep(model, clean, corrupt, _metric, reuse=form,
                                                batch_size=5, **args)
                    torch.testing.assert_close(
                        r.effects, plain.effects, atol=1e-4 if arch in FP32 else 1e-9, rtol=0,
                        msg=f"{arch} {kind} {per_position} {noising}")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_heads_at_every_position_and_noising(arch):
    model, clean, corrupt = _case(arch)
    r = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out",
                                per_position=False, progress=False)
    H = _heads(model)
    assert r.effects.shape == (3, H) and r.axes() == ("block", "head")
    torch.testing.assert_close(r.effects.double(), _loop_effects(
        model, arch, "head_out", clean, corrupt, per_position=False).double(), **_tol(arch))
    n = steerops.patching_sweep(model, clean, corrupt, _metric, sites="mlp_out",
                                noising=True, progress=False)
    torch.testing.assert_close(n.effects.double(), _loop_effects(
        model, arch, "mlp_out", clean, corrupt, noising=True).double(), **_tol(arch))


def _atp_reference(model, arch, kind, clean, corrupt):
    """(clean - corrupt) . dm/da per unit, with autograd through plain hooks."""
    store, clean_logits = _capture(model, arch, kind, clean)
    L = len(find_layers(model))
    acts = {}

    def keep(b):
        def fn(a):
            acts[b] = a
            return a
        return fn
    hooks = [h for b in range(L) for h in _hook(model, arch, kind, b, keep(b))]
    emb = model.get_input_embeddings()
    leaf = emb(corrupt).detach().requires_grad_(True)
    try:
        m = _metric(model(inputs_embeds=leaf).logits)
        grads = torch.autograd.grad(m.sum(), [acts[b] for b in range(L)])
    finally:
        for h in hooks:
            h.remove()
    U = {"head_out": _heads(model)}.get(kind, 1)
    out = []
    for b, g in enumerate(grads):
        d = (store[b] - acts[b].detach()) * g
        if kind == "neuron":
            out.append(d)  # (pairs, T, d_mlp)
        else:
            out.append(d.unflatten(-1, (U, -1)).sum(-1))  # (pairs, T, U)
    raw = torch.stack(out, 1)
    denom = _metric(clean_logits).mean() - m.detach().mean()
    scores = raw.mean(0) / denom
    if kind == "head_out":
        return scores.transpose(-1, -2)
    return scores if kind == "neuron" else scores[..., 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_atp_every_kind_equals_autograd_through_hooks(arch):
    model, clean, corrupt = _case(arch)
    maps = {}
    for kind in _kinds(arch) + ["neuron"]:
        a = steerops.attribution_patching(model, clean, corrupt, _metric, sites=kind)
        expected = _atp_reference(model, arch, kind, clean, corrupt)
        assert a.scores.shape == expected.shape, kind
        torch.testing.assert_close(a.scores.double(), expected.double(), **_tol(arch),
                                   msg=f"{arch} {kind}")
        maps[kind] = a
    H, d_mlp = _heads(model), maps["neuron"].scores.shape[-1]
    assert maps["head_out"].axes() == ("block", "head", "position")
    assert maps["neuron"].scores.shape == (3, 5, d_mlp)
    if arch != "gemma2":  # linear after the heads / neurons: the parts add up
        torch.testing.assert_close(maps["head_out"].scores.sum(1), maps["attn_out"].scores,
                                   **_tol(arch))
        torch.testing.assert_close(maps["neuron"].scores.sum(-1), maps["mlp_out"].scores,
                                   **_tol(arch))
    assert H > 1


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gemma2"])
def test_cache_activations_every_kind(arch):
    model, clean, _ = _case(arch)
    for kind in _kinds(arch) + ["neuron"]:
        store, _ = _capture(model, arch, kind, clean)
        c = steerops.cache_activations(model, clean, positions=[1, 4], sites=kind)
        assert c.sites == kind and c.layers == [0, 1, 2]
        for b in range(3):
            torch.testing.assert_close(c[b], store[b][:, [1, 4]], msg=f"{arch} {kind} {b}")
    c = steerops.cache_activations(model, clean, sites="head_out", layers=[2])
    assert c.heads(2).shape == (2, 5, _heads(model), c.acts.shape[-1] // _heads(model))


def test_top_sites_name_heads_and_neurons():
    model, clean, corrupt = _case("llama")
    r = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out",
                                progress=False)
    top = r.top_sites(3)
    e = r.effects
    for block, head, position, value in top:
        assert value == pytest.approx(float(e[block, head, position]))
    assert top[0][-1] == pytest.approx(float(e.max()))
    a = steerops.attribution_patching(model, clean, corrupt, _metric, sites="neuron",
                                      positions=[3, 4])
    block, position, neuron, value = a.top_sites(1)[0]
    assert position in (3, 4)
    assert value == pytest.approx(float(a.scores[block, [3, 4].index(position), neuron]))


def test_component_sweeps_split_into_units_give_the_same_map(tmp_path):
    model, clean, corrupt = _case("gpt2", pairs=3)
    whole = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out",
                                    progress=False)
    split = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out",
                                    shard_dir=str(tmp_path), pairs_per_unit=2, progress=False)
    torch.testing.assert_close(split.effects, whole.effects)
    again = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out",
                                    shard_dir=str(tmp_path), pairs_per_unit=2, progress=False)
    torch.testing.assert_close(again.effects, whole.effects)
    assert split.sites == "head_out"


def test_plan_counts_heads_and_prices_the_floor():
    model, clean, corrupt = _case("gpt2")
    H = _heads(model)
    plain = steerops.plan_sweep(model, clean, corrupt, _metric, sites="head_out", reuse="none")
    assert plain.sites == 2 * 3 * 5 * H
    assert plain.identical == 2 * 3 * 1 * H  # position 0 of each pair, every block and head
    assert plain.flops["floor"] < plain.flops["plan"] <= plain.flops["naive_batched"] * 1.01
    full = steerops.plan_sweep(model, clean, corrupt, _metric, sites="head_out", reuse="full")
    assert full.flops["floor"] <= full.flops["plan"] < plain.flops["plan"]
    assert "head_out sites" in full.describe()
    # the plan's counts are the run's
    r = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out", reuse="full",
                                progress=False)
    assert r.extra["reuse"]["identical_sites_skipped"] == full.identical
    assert r.forwards == full.forwards and r.rows == full.rows
    whole = steerops.plan_sweep(model, clean, corrupt, _metric, sites="head_out",
                                per_position=False)
    assert whole.sites == 2 * 3 * H and whole.identical == 0


@pytest.mark.parametrize("call, message", [
    (lambda m, c, x: steerops.patching_sweep(m, c, x, _metric, sites="heads"), "sites must be"),
    (lambda m, c, x: steerops.patching_sweep(m, c, x, _metric, sites="neuron"),
     "sites='neuron' is not available"),
    (lambda m, c, x: steerops.patching_sweep(m, c, x, _metric, sites="attn_out",
                                             per_position=False), "needs sites='head_out'"),
    (lambda m, c, x: steerops.attribution_patching(m, c, x, _metric, sites="mlp_out",
                                                   layers=[3]), "block 3 out of range"),
    (lambda m, c, x: steerops.cache_activations(m, c, sites=7), "sites must be"),
])
def test_site_errors_are_one_line(call, message):
    model, clean, corrupt = _case("gpt2")
    with pytest.raises((ValueError, TypeError)) as e:
        call(model, clean, corrupt)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resid_mid_refused_on_parallel_blocks():
    model, clean, corrupt = _case("gpt_neox")
    assert model.config.use_parallel_residual
    with pytest.raises(ValueError, match="in parallel"):
        steerops.attribution_patching(model, clean, corrupt, _metric, sites="resid_mid")


def test_head_map_plots(tmp_path):
    model, clean, corrupt = _case("gpt2")
    r = steerops.patching_sweep(model, clean, corrupt, _metric, sites="head_out",
                                progress=False)
    ax = r.plot(str(tmp_path / "heads.png"))
    assert (tmp_path / "heads.png").stat().st_size > 0
    assert ax.get_ylabel() == "block.head" and len(ax.get_yticklabels()) == 3 * _heads(model)
    a = steerops.attribution_patching(model, clean, corrupt, _metric, sites="neuron")
    ax = a.plot(str(tmp_path / "neurons.png"))
    assert "summed over neurons" in ax.get_title()


def test_cli_names_every_kind():
    from steerops.app.cli_args import SITE_KIND_NAMES
    from steerops.model.sites import SITE_KINDS
    assert tuple(SITE_KINDS) == SITE_KIND_NAMES


def test_head_patching_benchmark(monkeypatch, tmp_path):
    """`steerops bench patching --sites head_out` on a tiny GPT-2: every form gives the
    hook loop's values, ratios are taken round by round, the report is written."""
    import json

    from steerops.bench import patching as PB
    monkeypatch.setattr(PB, "build_model", lambda kind, device: causal_lm("gpt2"))
    monkeypatch.setattr(PB, "CONFIGS", {"tiny T=5": ("gpt2", 5)})
    monkeypatch.setattr(PB, "HEAD_CONFIGS", ["tiny T=5"])
    threads = torch.get_num_threads()
    try:
        assert PB.main(["--sites", "head_out", "--pairs", "2", "--repeats", "2", "--out",
                        str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    c = json.loads((tmp_path / "head_patching.json").read_text())["configs"][0]
    assert c["heads"] == 4 and c["forms"]["reuse"]["patched_sites"] == 2 * 3 * 4 * 5
    assert c["forms"]["reuse_all"]["patched_sites"] == 2 * 3 * 4
    for form, e in c["forms"].items():
        assert e["max_abs_diff_vs_loop"] < 1e-4, form
        loop = "hook_loop_all" if form.endswith("_all") else "hook_loop"
        assert e["loop_over_this"]["per_round"] == pytest.approx(
            [a / b for a, b in zip(c["forms"][loop]["runs"], e["runs"])])
    assert c["forms"]["reuse"]["plan_form"] == "full"
    assert "| tiny T=5 | reuse |" in (tmp_path / "head_patching.md").read_text()
