"""Never silently wrong, part 2: each input that used to give wrong numbers, or a
traceback from deep inside, now gives the correct result or a one-line error
naming the argument."""
import os
import warnings

import pytest
import torch

import steerops
from hf_models import V, causal_lm, prompts


def _pairs(pairs=3, length=6):
    clean = prompts(pairs, length, seed=11)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 7) % (V - 1) + 1
    return clean, corrupt


def _metric(pairs=3):
    return steerops.logit_diff(torch.arange(1, pairs + 1), torch.arange(10, 10 + pairs))


@pytest.fixture
def model():
    return causal_lm("llama")


# ----------------------------------------------------------------------------- counts, layers


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
@pytest.mark.parametrize("reuse", ["none", "full"])
def test_sweep_batch_size_must_be_positive(model, bad, reuse):
    clean, corrupt = _pairs()
    with pytest.raises(ValueError, match=f"batch_size must be a positive int.*{bad!r}"):
        steerops.patching_sweep(model, clean, corrupt, _metric(), batch_size=bad, reuse=reuse,
                                progress=False)


@pytest.mark.parametrize("name,bad", [("pairs_per_unit", 0), ("memory_budget_mb", -5),
                                      ("memory_budget_mb", float("nan"))])
def test_sweep_other_counts_must_be_positive(model, name, bad):
    clean, corrupt = _pairs()
    with pytest.raises(ValueError, match=name):
        steerops.patching_sweep(model, clean, corrupt, _metric(), progress=False,
                                **{name: bad})


@pytest.mark.parametrize("bad", [0, -1])
def test_attribution_batch_size_must_be_positive(model, bad):
    clean, corrupt = _pairs()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        steerops.attribution_patching(model, clean, corrupt, _metric(), batch_size=bad)


def test_empty_layers_is_an_error_everywhere(model):
    clean, corrupt = _pairs()
    calls = [lambda: steerops.cache_activations(model, clean, layers=[]),
             lambda: steerops.cache_gradients(model, clean, _metric(), layers=[]),
             lambda: steerops.patching_sweep(model, clean, corrupt, _metric(), layers=[]),
             lambda: steerops.attribution_patching(model, clean, corrupt, _metric(), layers=[])]
    for call in calls:
        with pytest.raises(ValueError, match=r"layers is empty: give at least one layer in "
                                             r"0 \.\. 3"):
            call()


def test_steering_layer_must_be_ints(model):
    v = torch.randn(32)
    with pytest.raises(TypeError, match="layer must be an int, a list of ints"):
        steerops.Steering(model, 1.0, v)
    with pytest.raises(TypeError, match="layer must be ints"):
        steerops.Steering(model, [1, 2.0], v)
    with pytest.raises(ValueError, match="layer is None"):
        steerops.Steering(model, None, v)


def test_empty_batch_or_zero_tokens_is_an_error(model):
    for bad in (torch.zeros(0, 5, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="inputs is empty"):
            steerops.cache_activations(model, bad)
        with pytest.raises(ValueError, match="clean is empty"):
            steerops.patching_sweep(model, bad, bad.clone(), steerops.logit_diff(1, 2))
    with pytest.raises(ValueError, match=r"must be \(batch, tokens\)"):
        steerops.cache_activations(model, torch.tensor([1, 2, 3]))


def test_top_sites_k_must_be_positive(model):
    clean, corrupt = _pairs()
    r = steerops.attribution_patching(model, clean, corrupt, _metric())
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be a positive int"):
            r.top_sites(bad)
    assert len(r.top_sites(1000)) == r.scores.numel()


def test_top_sites_ranks_nan_last(model):
    clean, corrupt = _pairs()
    r = steerops.attribution_patching(model, clean, corrupt, _metric())
    r.scores[0, 0] = float("nan")
    r.scores[1, 1] = 1e9
    top = r.top_sites(r.scores.numel())
    assert top[0][:2] == (1, 1)
    assert (top[-1][0], top[-1][1]) == (0, 0) and top[-1][2] != top[-1][2]


# ----------------------------------------------------------------------------- metrics


def test_logit_diff_position_out_of_range(model):
    clean, corrupt = _pairs()
    T = clean.shape[1]
    for position in (T, -T - 1, torch.tensor([0, 1, T])):
        metric = steerops.logit_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]),
                                     position=position)
        with pytest.raises(ValueError, match="position"):
            steerops.patching_sweep(model, clean, corrupt, metric, progress=False)


@pytest.mark.parametrize("kind", ["int", "bool"])
def test_metric_must_be_floating(model, kind):
    clean, corrupt = _pairs()

    def metric(logits):
        top = logits[:, -1].argmax(-1)
        return top if kind == "int" else top == 3
    for sweep in (steerops.patching_sweep, steerops.attribution_patching):
        with pytest.raises(TypeError, match=r"metric must return floating values"):
            sweep(model, clean, corrupt, metric)


def test_metric_nan_everywhere_is_named(model):
    clean, corrupt = _pairs()
    for sweep in (steerops.patching_sweep, steerops.attribution_patching):
        with pytest.raises(ValueError, match="metric is NaN or Inf on the clean run of 3 of 3"):
            sweep(model, clean, corrupt, lambda logits: logits[:, -1, 0] * float("nan"))


@pytest.mark.parametrize("reuse", ["none", "full"])
def test_metric_nan_on_some_patched_rows_is_an_error(model, reuse):
    """A metric finite on the clean and corrupt runs but NaN on a few patched rows
    (a log-margin reaching log 0) used to give NaN effects that top_sites ranked first."""
    clean, corrupt = _pairs()
    base = _metric()
    with torch.no_grad():
        ends = [base(model(x).logits, torch.arange(3)) for x in (clean, corrupt)]

    def metric(logits, pair_index):
        m = base(logits, pair_index)
        # NaN wherever the value is neither the clean nor the corrupt run's (patched rows)
        moved = torch.stack([(m - e[pair_index]).abs() > 1e-4 for e in ends]).all(0)
        return torch.where(moved, m * float("nan"), m)
    metric.num_pairs = 3
    with pytest.raises(ValueError, match=r"NaN or Inf at \d+ of \d+ patched \(pair, site\) rows, "
                                         r"first at pair \d+, layer \d+, position \d+"):
        steerops.patching_sweep(model, clean, corrupt, metric, reuse=reuse, progress=False)


def test_optimize_with_a_nan_metric_is_an_error(model):
    pos, neg = _pairs()
    with pytest.raises(ValueError, match="metric is NaN or Inf at optimisation step 0"):
        steerops.learn_steering_vector(model, pos, neg, 1, method="optimize", steps=3,
                                       metric=lambda logits: logits[:, -1, 0] * float("nan"))


# ----------------------------------------------------------------------------- train mode


def test_sweeps_run_a_training_model_in_eval_mode_and_say_so():
    model = causal_lm("gpt2")  # dropout 0.1 in train mode
    model.train()
    clean, corrupt = _pairs()
    runs = []
    for _ in range(2):
        with pytest.warns(UserWarning, match="model is in train mode"):
            runs.append(steerops.patching_sweep(model, clean, corrupt, _metric(),
                                                progress=False).effects)
        assert model.training  # put back
    with pytest.warns(UserWarning, match="train mode"):
        atp = [steerops.attribution_patching(model, clean, corrupt, _metric()).scores
               for _ in range(2)]
    with pytest.warns(UserWarning, match="train mode"):
        acts = [steerops.cache_activations(model, clean).acts for _ in range(2)]
    with pytest.warns(UserWarning, match="train mode"):
        vecs = [steerops.learn_steering_vector(model, clean, corrupt, 2).vector
                for _ in range(2)]
    for a, b in (runs, atp, acts, vecs):
        assert torch.equal(a, b)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(
            steerops.patching_sweep(model, clean, corrupt, _metric(), progress=False).effects,
            runs[0])


# ----------------------------------------------------------------------------- steering


def test_reentering_one_steering_object_keeps_steering(model):
    ids = prompts()
    s = steerops.Steering(model, 1, torch.randn(32) * 3, 2.0)
    with torch.no_grad():
        plain = model(ids).logits
        with s:
            steered = model(ids).logits
            with s:
                inner = model(ids).logits
            after_inner = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(steered, plain)
    torch.testing.assert_close(inner, steered)
    torch.testing.assert_close(after_inner, steered)
    torch.testing.assert_close(after, plain)
    assert not s._handles


def test_steer_alpha_of_batch_length_is_refused_not_read_per_position():
    hidden, v = torch.randn(4, 4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"alpha must be .* got shape \(4,\); for one alpha per "
                                         r"batch row use alpha\[:, None\]"):
        steerops.steer(hidden, v, alpha=torch.randn(4))
    alpha = torch.randn(4)
    out = steerops.steer(hidden, v, alpha=alpha[:, None])
    torch.testing.assert_close(out, hidden + alpha[:, None, None] * v)
    # the documented shapes still work
    a16 = torch.randn(16)
    torch.testing.assert_close(steerops.steer(hidden, v, alpha=a16),
                               hidden + a16.reshape(4, 4, 1) * v)
    torch.testing.assert_close(steerops.steer(hidden, v, alpha=a16.reshape(4, 4)),
                               hidden + a16.reshape(4, 4, 1) * v)


# ----------------------------------------------------------------------------- narrow index dtypes


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_narrow_index_dtypes_are_read_correctly(backend, dtype):
    hidden, source = torch.randn(300, 8, dtype=torch.float64), torch.randn(300, 8,
                                                                           dtype=torch.float64)
    hi = 127 if dtype == torch.int8 else 255 if dtype == torch.uint8 else 299
    dst, src = torch.tensor([hi, 5], dtype=dtype), torch.tensor([3, 7], dtype=dtype)
    out = steerops.patch(hidden, source, dst, src)
    want = hidden.clone()
    want[[hi, 5]] = source[[3, 7]]
    torch.testing.assert_close(out, want)
    psrc = torch.full((300,), -1, dtype=torch.int64)
    psrc[hi] = 3
    if dtype != torch.uint8:  # uint8 cannot say -1 (not patched)
        out = steerops.intervene(hidden, source=source, patch_src=psrc.to(dtype))
        torch.testing.assert_close(out, want.where(torch.arange(300)[:, None] != 5, hidden))
    small = torch.randn(4, 8, dtype=torch.float64)
    out = steerops.intervene(small, source=source,
                             patch_src=torch.tensor([hi, 1, 2, 3], dtype=dtype))
    torch.testing.assert_close(out, source[[hi, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"dst_index out of range: values must be in \[0, 10\)"):
        steerops.patch(hidden[:10], source, torch.tensor([hi], dtype=dtype),
                       torch.tensor([3], dtype=dtype))


# ----------------------------------------------------------------------------- SteeringVector files


def test_steering_vector_load_refuses_bad_files(model, tmp_path):
    clean, corrupt = _pairs()
    sv = steerops.learn_steering_vector(model, clean, corrupt, 2)
    good = tmp_path / "good.safetensors"
    sv.save(good)
    assert torch.equal(steerops.SteeringVector.load(good).vector, sv.vector)

    data = good.read_bytes()
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(data[:-16] + b"\xff" * 16)  # the last 4 floats become NaN
    with pytest.raises(ValueError, match=f"{corrupted}.*non-finite"):
        steerops.SteeringVector.load(corrupted)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{truncated} is not a readable safetensors file"):
        steerops.SteeringVector.load(truncated)

    from safetensors.torch import save_file
    no_layer = tmp_path / "no_layer.safetensors"
    save_file({"vector": torch.randn(32)}, str(no_layer),
              metadata={"steerops": '{"hidden_size": 32}'})
    with pytest.raises(ValueError, match=f"{no_layer} has steerops metadata without layer"):
        steerops.SteeringVector.load(no_layer)

    with pytest.raises(ValueError, match=f"{tmp_path} is a folder"):
        steerops.SteeringVector.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        steerops.SteeringVector.load(os.path.join(tmp_path, "missing.safetensors"))


# ----------------------------------------------------------------------------- issue 31, Python

def test_empty_or_non_text_prompt_lists_are_named(tiny):
    import steerops
    from steerops.app.tiny import TEMPLATE
    model, tok = tiny
    c = TEMPLATE.format(a="Mary", b="John", place="store", obj="drink")
    x = TEMPLATE.format(a="Sarah", b="John", place="store", obj="drink")
    metric = steerops.logit_diff("Mary", "John")
    calls = {
        "patching_sweep": lambda a, b: steerops.patching_sweep(model, a, b, metric,
                                                               tokenizer=tok, progress=False),
        "attribution_patching": lambda a, b: steerops.attribution_patching(
            model, a, b, metric, tokenizer=tok),
        "cache_activations": lambda a, b: steerops.cache_activations(model, a, tokenizer=tok),
        "learn_steering_vector": lambda a, b: steerops.learn_steering_vector(
            model, a, b, layer=2, tokenizer=tok),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"is empty: give at least one prompt"):
            call([], [])
        with pytest.raises(ValueError, match=r"\[1\] is NoneType, not text"):
            call([c, None], [x, x])
    sv = steerops.learn_steering_vector(model, [c], [x], layer=2, tokenizer=tok)
    steering = steerops.Steering(model, None, sv, alpha=1.0)
    with pytest.raises(ValueError, match="prompts is empty"):
        steering.generate([], tok)
    for bad in (1.5, 0, True, "2"):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            steering.generate([c], tok, max_new_tokens=bad)


def test_a_pair_whose_answer_is_its_wrong_is_an_error(tiny):
    import steerops
    model, tok = tiny
    with pytest.raises(ValueError, match="same token .* at pair 1"):
        steerops.logit_diff(torch.tensor([3, 4]), torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="for every pair"):
        steerops.prob_diff(3, 3)
    metric = steerops.logit_diff(["Mary", "John"], ["John", "John"])  # resolved at the call
    c = ["When Mary and John went to the store , John gave a drink to"] * 2
    x = ["When Sarah and John went to the store , John gave a drink to"] * 2
    with pytest.raises(ValueError, match="at pair 1"):
        steerops.patching_sweep(model, c, x, metric, tokenizer=tok, progress=False)


def test_right_padded_batches_count_positions_from_each_pairs_real_tokens(tiny):
    """Issue 31, case 2: a metric position counts from each pair's last real token; a
    negative cached position or a custom metric on a right-padded batch is refused."""
    import steerops
    model, tok = tiny
    tok = type(tok).from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    tok.padding_side = "right"
    long_c = "When Mary and John went to the store , John gave a drink to"
    long_x = "When Sarah and John went to the store , John gave a drink to"
    short_c, short_x = "When Tom and Kate went to the park , Kate gave", \
        "When Paul and Kate went to the park , Kate gave"
    for position in (-1, -2):
        metric = steerops.logit_diff(["Mary", "Tom"], ["John", "Kate"], position)
        both = steerops.attribution_patching(model, [long_c, short_c], [long_x, short_x],
                                             metric, tokenizer=tok)
        for i, (c, x) in enumerate(((long_c, long_x), (short_c, short_x))):
            alone = steerops.attribution_patching(
                model, [c], [x], steerops.logit_diff(["Mary", "Tom"][i], ["John", "Kate"][i],
                                                     position), tokenizer=tok)
            assert float(both.clean_metric[i]) == pytest.approx(float(alone.clean_metric[0]),
                                                                abs=1e-4)
    with pytest.raises(ValueError, match="negative positions on a right-padded batch"):
        steerops.cache_activations(model, [long_c, short_c], positions=[-1], tokenizer=tok)
    with pytest.raises(ValueError, match="custom metric on a right-padded batch"):
        steerops.patching_sweep(model, [long_c, short_c], [long_x, short_x],
                                lambda logits: logits[:, -1, 0], tokenizer=tok, progress=False)
    tok.padding_side = "left"  # the way out the message names
    cache = steerops.cache_activations(model, [long_c, short_c], positions=[-1], tokenizer=tok)
    assert cache.acts.shape[0] == 2
