"""Hugging Face integration on tiny random models (CPU): site numbering,
steering vs an independent plain-hook implementation, KV-cache generation,
patching sweeps vs a naive loop, AtP vs autograd, steering vectors."""
import pytest
import torch

import steerops
from hf_models import CAUSAL, V, bert, cache_kwargs, causal_lm, output_cache, prompts
from steerops.model.blocks import find_layers

ARCHS = list(CAUSAL)


def _blocks(model):
    return find_layers(model)


def _plain_hook(model, layer, fn):
    """Independent hook: fn(hidden) -> new hidden at site ``layer``."""
    blocks = _blocks(model)
    if layer == 0:
        def pre(module, args, kwargs):
            if args:
                return (fn(args[0]),) + args[1:], kwargs
            kwargs = dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
            return args, kwargs
        return blocks[0].register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + out[1:]
        return fn(out)
    return blocks[layer - 1].register_forward_hook(post)


def _plain_capture(model, ids, layers):
    store = {}

    def keep(layer):
        def fn(h):
            store[layer] = h.detach().clone()
            return h
        return fn
    handles = [_plain_hook(model, l, keep(l)) for l in layers]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return store, logits


def _plain_steer(h, v, a, mode):
    """The math of each mode, written out with plain torch."""
    u = v / v.norm()
    if mode == "add":
        return h + a * v
    if mode == "norm_scaled":
        return h + a * h.norm(dim=-1, keepdim=True) * u
    hu = (h * u).sum(-1, keepdim=True)
    if mode == "ablate":
        return h - a * hu * u
    return h + (a - hu) * u


# ----------------------------------------------------------------------------- sites


@pytest.mark.parametrize("arch", ARCHS)
def test_site_numbering_matches_output_hidden_states(arch):
    model = causal_lm(arch)
    ids = prompts()
    L = len(_blocks(model))
    cache = steerops.cache_activations(model, ids)
    assert cache.layers == list(range(L + 1))
    assert cache.acts.shape == (3, L + 1, 7, 32)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == L + 1
    for layer in range(L):  # the last entry may have the final norm applied
        torch.testing.assert_close(cache[layer], hs[layer])
    plain, _ = _plain_capture(model, ids, [L])
    torch.testing.assert_close(cache[L], plain[L])


def test_cache_keeps_only_requested_sites_and_stops_early():
    model = causal_lm("llama")
    ids = prompts()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    cache = steerops.cache_activations(model, ids, layers=[1, 2], positions=[0, -1])
    assert cache.acts.shape == (3, 2, 2, 32) and calls == []  # never reached the LM head
    full = steerops.cache_activations(model, ids)
    assert full.output is None and calls == []  # stopped after the last block
    full = steerops.cache_activations(model, ids, stop_early=False)
    torch.testing.assert_close(cache[2], full[2][:, [0, 6]])
    assert len(calls) == 1 and full.output.shape == (3, 7, V)


def test_bert_encoder_sites_and_steering():
    model = bert()
    ids = prompts()
    cache = steerops.cache_activations(model, ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for layer in range(4):
        torch.testing.assert_close(cache[layer], hs[layer])
    v = torch.randn(32)
    handle = _plain_hook(model, 2, lambda h: _plain_steer(h, v, 2.0, "add"))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    handle.remove()
    with steerops.Steering(model, 2, v, 2.0), torch.no_grad():
        got = model(ids).last_hidden_state
    torch.testing.assert_close(got, want)


def test_unknown_architecture_and_explicit_path():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    with pytest.raises(ValueError, match="tried model.layers"):
        find_layers(Odd())
    assert len(find_layers(Odd(), "blocks")) == 2
    with pytest.raises(ValueError, match="layers_path"):
        find_layers(Odd(), "nope")


# ----------------------------------------------------------------------------- steering


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["add", "norm_scaled", "ablate", "clamp"])
def test_steering_matches_plain_hook(arch, mode):
    model = causal_lm(arch)
    ids = prompts()
    v = torch.randn(32)
    layer = 2
    handle = _plain_hook(model, layer, lambda h: _plain_steer(h, v, 1.5, mode))
    with torch.no_grad():
        want = model(ids).logits
    handle.remove()
    with steerops.Steering(model, layer, v, 1.5, mode=mode), torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.allclose(plain, got)  # detached: back to the unsteered model


def test_steering_several_layers_and_embeddings():
    model = causal_lm("gpt2")
    ids = prompts()
    vs = {0: torch.randn(32), 3: torch.randn(32)}
    handles = [_plain_hook(model, l, (lambda v: lambda h: _plain_steer(h, v, 0.7, "clamp"))(v))
               for l, v in vs.items()]
    with torch.no_grad():
        want = model(ids).logits
    for h in handles:
        h.remove()
    with steerops.Steering(model, None, vs, 0.7, mode="clamp"), torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_per_row_vectors_and_alphas_in_one_batch():
    model = causal_lm("llama")
    ids = prompts(batch=3)
    vectors = torch.randn(2, 32)
    vi = torch.tensor([1, 0, 1])
    alpha = torch.tensor([0.5, -1.0, 2.0])
    with steerops.Steering(model, 1, vectors, alpha, mode="norm_scaled", vector_index=vi), \
            torch.no_grad():
        batched = model(ids).logits
    for row in range(3):
        with steerops.Steering(model, 1, vectors[vi[row]], float(alpha[row]),
                               mode="norm_scaled"), torch.no_grad():
            single = model(ids[row:row + 1]).logits
        torch.testing.assert_close(batched[row:row + 1], single, rtol=1e-4, atol=1e-4)


def test_steering_positions_explicit_and_mask():
    model = causal_lm("qwen2")
    ids = prompts()
    v = torch.randn(32)
    cols = torch.zeros(3, 7, dtype=torch.bool)
    cols[:, [1, 6]] = True

    def only_cols(h):
        return torch.where(cols[..., None], _plain_steer(h, v, 3.0, "add"), h)
    handle = _plain_hook(model, 1, only_cols)
    with torch.no_grad():
        want = model(ids).logits
    handle.remove()
    for positions in ([1, -1], [1, 6], cols):
        with steerops.Steering(model, 1, v, 3.0, positions=positions), torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def _greedy(model, ids, attention_mask, use_cache):
    """(tokens, per-step logits) of greedy generation."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=6,
                             do_sample=False, use_cache=use_cache, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [2, -1, 4], "mask"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_generation_with_cache_equals_without(arch, positions, padding):
    model = causal_lm(arch, seed=3)
    ids = prompts(batch=2, length=6, seed=5)
    attn = torch.ones_like(ids)
    if padding == "left":
        ids[0, :2] = 0
        attn[0, :2] = 0
    if positions == "mask":
        positions = torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    v = torch.randn(32) * 4
    # both generations in one block: a forward with no cached tokens starts a new prompt
    with steerops.Steering(model, 2, v, 2.0, mode="norm_scaled", positions=positions):
        cached, cached_logits = _greedy(model, ids, attn, True)
        uncached, uncached_logits = _greedy(model, ids, attn, False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, rtol=1e-4, atol=1e-4)
    _, plain_logits = _greedy(model, ids, attn, True)
    assert not torch.allclose(plain_logits, cached_logits, atol=1e-3)  # steering is visible


def test_steering_under_kv_cache_hits_the_right_positions():
    """Only generated tokens steered: the prompt's logits equal the unsteered ones."""
    model = causal_lm("llama")
    ids = prompts(batch=1)
    v = torch.randn(32) * 5
    with torch.no_grad():
        base = model(ids).logits
    with steerops.Steering(model, 1, v, 1.0, positions="generated"), torch.no_grad():
        out = model(ids, use_cache=True)
        torch.testing.assert_close(out.logits, base)  # the prompt is not steered
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, **cache_kwargs(model, output_cache(out)), use_cache=True).logits
    with torch.no_grad():
        plain = model(torch.cat([ids, nxt], 1)).logits[:, -1:]
    assert not torch.allclose(step, plain, atol=1e-4)  # the new token is steered


def test_steering_validation():
    model = causal_lm("llama")
    with pytest.raises(ValueError, match="hidden size 32"):
        steerops.Steering(model, 1, torch.randn(31))
    with pytest.raises(ValueError, match="out of range"):
        steerops.Steering(model, 4, torch.randn(32))
    with pytest.raises(ValueError, match="vector_index"):
        steerops.Steering(model, 1, torch.randn(2, 32))
    with pytest.raises(ValueError, match="zero-norm"):
        steerops.Steering(model, 1, torch.zeros(32), mode="ablate")
    with pytest.raises(ValueError, match="positions"):
        steerops.Steering(model, 1, torch.randn(32), positions="middle")
    s = steerops.Steering(model, 1, torch.randn(2, 32), vector_index=torch.tensor([0, 1]))
    with s, pytest.raises(ValueError, match="vector_index has 2 entries, batch has 3"):
        model(prompts(batch=3))


def test_steering_gradient_flows_to_vector_and_alpha():
    model = causal_lm("llama")
    ids = prompts()
    v = torch.randn(32, requires_grad=True)
    a = torch.tensor(0.5, requires_grad=True)
    with steerops.Steering(model, 2, v, a, mode="norm_scaled"):
        loss = model(ids).logits[:, -1, 3].sum()
    gv, ga = torch.autograd.grad(loss, [v, a])
    vv = v.detach().clone().requires_grad_(True)
    aa = a.detach().clone().requires_grad_(True)
    handle = _plain_hook(model, 2, lambda h: _plain_steer(h, vv, aa, "norm_scaled"))
    loss2 = model(ids).logits[:, -1, 3].sum()
    handle.remove()
    gv2, ga2 = torch.autograd.grad(loss2, [vv, aa])
    torch.testing.assert_close(gv, gv2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ga, ga2, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- patching


def _pairs(batch=3, length=6):
    clean = prompts(batch, length, seed=11)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 7) % (V - 1) + 1  # symmetric single-token replacement
    corrupt[:, 3] = (clean[:, 3] + 3) % (V - 1) + 1
    answer = torch.randint(1, V, (batch,), generator=torch.Generator().manual_seed(2))
    wrong = (answer + 5) % V
    return clean, corrupt, steerops.logit_diff(answer, wrong)


def _naive_sweep(model, clean, corrupt, metric, layers, positions, noising=False):
    """One site per forward with plain hooks: the reference."""
    source, target = (corrupt, clean) if noising else (clean, corrupt)
    store, _ = _plain_capture(model, source, layers)
    raw = torch.empty(source.shape[0], len(layers), len(positions))
    for i in range(source.shape[0]):
        for li, layer in enumerate(layers):
            for j, p in enumerate(positions):
                def put(h, i=i, layer=layer, p=p):
                    h = h.clone()
                    h[0, p] = store[layer][i, p]
                    return h
                handle = _plain_hook(model, layer, put)
                with torch.no_grad():
                    logits = model(target[i:i + 1]).logits
                handle.remove()
                raw[i, li, j] = metric(logits, torch.tensor([i]))[0]
    return raw


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("noising", [False, True])
@pytest.mark.parametrize("reuse", ["none", "full"])
def test_patching_sweep_equals_naive_loop(arch, noising, reuse):
    model = causal_lm(arch)
    clean, corrupt, metric = _pairs()
    layers, positions = [0, 1, 3], [0, 1, 3, 5]
    result = steerops.patching_sweep(model, clean, corrupt, metric, layers=layers,
                                     positions=positions, noising=noising, batch_size=7,
                                     reuse=reuse, progress=False)
    naive = _naive_sweep(model, clean, corrupt, metric, layers, positions, noising)
    torch.testing.assert_close(result.raw, naive, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        m_clean = metric(model(clean).logits, torch.arange(3))
        m_corrupt = metric(model(corrupt).logits, torch.arange(3))
    torch.testing.assert_close(result.clean_metric, m_clean)
    torch.testing.assert_close(result.corrupt_metric, m_corrupt)
    denom = (m_clean - m_corrupt).mean()
    want = ((m_clean.mean() - naive.mean(0)) if noising else (naive.mean(0) - m_corrupt.mean()))
    torch.testing.assert_close(result.effects, want / denom, rtol=1e-3, atol=1e-4)
    if reuse == "none":  # (pair, site) rows batched 7 to a forward, after the 2 base runs
        assert result.forwards == 2 + -(-3 * 12 // 7)


def test_patching_sweep_full_layer_recovers_clean_and_auto_batch():
    model = causal_lm("llama")
    clean, corrupt, metric = _pairs()
    result = steerops.patching_sweep(model, clean, corrupt, metric, progress=False)
    assert result.effects.shape == (4, 6) and result.batch_size >= 1
    # positions that differ are the only ones that matter at the embeddings
    unchanged = [0, 2, 4, 5]
    torch.testing.assert_close(result.effects[0, unchanged], torch.zeros(4), atol=1e-5,
                               rtol=0)


def test_metric_of_logits_only_is_accepted():
    model = causal_lm("llama")
    clean, corrupt, _ = _pairs()
    result = steerops.patching_sweep(model, clean, corrupt, lambda logits: logits[:, -1, 5],
                                     layers=[1], positions=[1], progress=False)
    assert result.raw.shape == (3, 1, 1)


def test_prob_diff_metric():
    logits = torch.tensor([[[0.0, 1.0, 2.0]], [[2.0, 0.0, 0.0]]])
    m = steerops.prob_diff(torch.tensor([2, 0]), 1, position=0)
    p = logits.softmax(-1)[:, 0]
    torch.testing.assert_close(m(logits, torch.tensor([0, 1])),
                               torch.stack([p[0, 2] - p[0, 1], p[1, 0] - p[1, 1]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attribution_patching_matches_autograd_on_plain_hooks(arch):
    model = causal_lm(arch)
    clean, corrupt, metric = _pairs()
    layers = [0, 1, 2, 3]
    result = steerops.attribution_patching(model, clean, corrupt, metric, layers=layers,
                                           batch_size=2)
    clean_acts, _ = _plain_capture(model, clean, layers)
    captured = {}

    def keep(layer):
        def fn(h):
            if layer == 0:
                h = h.detach().requires_grad_(True)
            captured[layer] = h
            return h
        return fn
    handles = [_plain_hook(model, l, keep(l)) for l in layers]
    m = metric(model(corrupt).logits, torch.arange(3))
    grads = torch.autograd.grad(m.sum(), [captured[l] for l in layers])
    for h in handles:
        h.remove()
    want = torch.stack([((clean_acts[l] - captured[l].detach()) * g).sum(-1)
                        for l, g in zip(layers, grads)], 1)
    torch.testing.assert_close(result.raw, want, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- vectors


def test_learn_mean_diff_and_pca():
    model = causal_lm("llama")
    clean, corrupt, _ = _pairs(batch=5)
    sv = steerops.learn_steering_vector(model, clean, corrupt, 2)
    store_p, _ = _plain_capture(model, clean, [2])
    store_n, _ = _plain_capture(model, corrupt, [2])
    diffs = store_p[2][:, -1] - store_n[2][:, -1]
    torch.testing.assert_close(sv.vector, diffs.mean(0))
    assert sv.layer == 2 and sv.hidden_size == 32 and sv.method == "mean_diff"
    pca = steerops.learn_steering_vector(model, clean, corrupt, 2, method="pca")
    u = pca.vector / pca.vector.norm()
    assert torch.dot(u, diffs.mean(0)) > 0
    # the first principal direction captures at least as much as the mean direction
    mu = diffs.mean(0) / diffs.mean(0).norm()
    assert (diffs @ u).pow(2).sum() >= (diffs @ mu).pow(2).sum() - 1e-5


def test_learn_optimize_improves_metric():
    model = causal_lm("llama")
    clean, corrupt, metric = _pairs(batch=4)
    sv = steerops.learn_steering_vector(model, clean, corrupt, 1, method="optimize",
                                        metric=metric, steps=25, lr=0.1)
    history = sv.settings["metric_history"]
    assert history[-1] > history[0] + 0.1
    assert all(p.grad is None for p in model.parameters())


def test_steering_vector_save_load(tmp_path):
    model = causal_lm("llama")
    sv = steerops.SteeringVector(torch.randn(32), 2, 32, "tiny-llama", "pca", {"position": -1})
    path = tmp_path / "v.safetensors"
    sv.save(path)
    back = steerops.SteeringVector.load(path)
    assert torch.equal(back.vector, sv.vector)
    assert (back.layer, back.hidden_size, back.model_name, back.method, back.settings) == \
        (2, 32, "tiny-llama", "pca", {"position": -1})
    with back.steer(model, 2.0), torch.no_grad():
        steered = model(prompts()).logits
    with steerops.Steering(model, 2, sv.vector, 2.0), torch.no_grad():
        torch.testing.assert_close(model(prompts()).logits, steered)
    wrong = steerops.SteeringVector(torch.randn(48), 1, 48, "other")
    with pytest.raises(ValueError, match="hidden size 48"):
        wrong.steer(model)
    with pytest.raises(ValueError, match="hidden size 48"):
        steerops.Steering(model, 1, wrong)


def test_right_padding_is_never_steered():
    model = causal_lm("llama")
    ids = prompts(batch=2)
    attn = torch.ones_like(ids)
    attn[1, 5:] = 0  # right padding on row 1
    seen = {}
    with steerops.Steering(model, 2, torch.randn(32) * 3, 1.0):
        handle = _plain_hook(model, 2, lambda h: seen.setdefault("steered", h.clone()))
        with torch.no_grad():
            model(ids, attention_mask=attn)
        handle.remove()
    with torch.no_grad():
        handle = _plain_hook(model, 2, lambda h: seen.setdefault("plain", h.clone()))
        model(ids, attention_mask=attn)
        handle.remove()
    torch.testing.assert_close(seen["steered"][1, 5:], seen["plain"][1, 5:])
    assert not torch.allclose(seen["steered"][1, :5], seen["plain"][1, :5])
    assert not torch.allclose(seen["steered"][0], seen["plain"][0])


def test_multi_layer_steering_vector(tmp_path):
    model = causal_lm("llama")
    vs = torch.randn(2, 32)
    sv = steerops.SteeringVector(vs, [1, 3], 32, "tiny", "mean_diff")
    sv.save(tmp_path / "multi.safetensors")
    back = steerops.SteeringVector.load(tmp_path / "multi.safetensors")
    assert back.layer == [1, 3] and torch.equal(back.vector, vs)
    with back.steer(model, 0.5, mode="clamp"), torch.no_grad():
        got = model(prompts()).logits
    with steerops.Steering(model, None, {1: vs[0], 3: vs[1]}, 0.5, mode="clamp"), \
            torch.no_grad():
        torch.testing.assert_close(model(prompts()).logits, got)
    with steerops.Steering(model, None, back, 0.5, mode="clamp"), torch.no_grad():
        torch.testing.assert_close(model(prompts()).logits, got)
    with pytest.raises(ValueError, match="for layer"):
        steerops.Steering(model, 2, back)
    with pytest.raises(ValueError, match="needs a vector of shape"):
        steerops.SteeringVector(torch.randn(3, 32), [1, 2], 32)


def test_result_top_sites_and_plot(tmp_path):
    model = causal_lm("llama")
    clean, corrupt, metric = _pairs()
    res = steerops.patching_sweep(model, clean, corrupt, metric, layers=[0, 2],
                                  positions=[1, 3, 5], progress=False)
    top = res.top_sites(2)
    flat = res.effects.flatten()
    assert [v for _, _, v in top] == pytest.approx(sorted(flat.tolist(), reverse=True)[:2])
    assert all(layer in (0, 2) and pos in (1, 3, 5) for layer, pos, _ in top)
    res.plot(tmp_path / "patching.png")
    atp = steerops.attribution_patching(model, clean, corrupt, metric)
    atp.plot(tmp_path / "atp.png", title="AtP")
    assert (tmp_path / "patching.png").stat().st_size > 1000
    assert (tmp_path / "atp.png").stat().st_size > 1000
    assert len(atp.top_sites(3)) == 3
