"""Never silently wrong: decode offsets under any cache keyword, new prompts in
one Steering block, compiled models, and a clear error for each input that
used to give wrong numbers or NaN without a word."""
import importlib
import json
import math
import warnings

import pytest
import torch

import steerops
from steerops.model import blocks
from hf_models import V, cache_kwargs, causal_lm, prompts
from steerops.model.decode import DecodeOffsetError, decode_offset

# torch before 2.13: see the compiled decode path's test
OLD_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


# ----------------------------------------------------------------------------- decode offset


class _FakeCache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


@pytest.mark.parametrize("keyword", ["past_key_values", "cache", "some_new_name"])
def test_decode_offset_from_a_cache_object_under_any_keyword(keyword):
    assert decode_offset({keyword: _FakeCache(5), "use_cache": True}, 1) == 5


def test_decode_offset_other_sources():
    legacy = ((torch.zeros(2, 4, 9, 8), torch.zeros(2, 4, 9, 8)),)
    assert decode_offset({"past_key_values": legacy}, 1) == 9
    assert decode_offset({}, 7) == 0  # no cache: the whole sequence from column 0
    assert decode_offset({"cache": None, "use_cache": True}, 7) == 0
    opaque = object()
    assert decode_offset({"cache": opaque, "cache_position": torch.tensor([11])}, 1) == 11
    assert decode_offset({"cache": opaque, "attention_mask": torch.ones(2, 13)}, 1) == 12
    assert decode_offset({"cache": opaque, "position_ids": torch.tensor([[4], [6]])}, 1) == 6
    with pytest.raises(DecodeOffsetError, match="cache=object"):
        decode_offset({"cache": opaque}, 1)


def test_steering_when_the_inner_model_is_called_directly():
    """Hooks fire without the top-level forward: the call is one prompt."""
    model = causal_lm("llama")
    ids = prompts()
    v = torch.randn(32)
    with steerops.Steering(model, 1, v, 2.0, positions="all"), torch.no_grad():
        want = model.model(ids).last_hidden_state
    with steerops.Steering(model, 1, v, 2.0, positions="prompt"), torch.no_grad():
        got = model.model(ids).last_hidden_state
    torch.testing.assert_close(got, want)


def test_model_called_with_an_unmeasurable_cache_is_an_error():
    model = causal_lm("llama")
    with steerops.Steering(model, 1, torch.randn(32), positions="prompt"):
        with pytest.raises(DecodeOffsetError):
            model(prompts(), **cache_kwargs(model, object()))


def test_two_generations_in_one_block_each_use_their_own_prompt():
    """'prompt' / 'generated' / -1 follow each generate call's prompt."""
    model = causal_lm("llama", seed=3)
    first, second = prompts(batch=1, length=5, seed=1), prompts(batch=1, length=8, seed=2)
    v = torch.randn(32) * 4
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    for positions in ("prompt", "generated", [-1]):
        alone = []
        for ids in (first, second):
            with steerops.Steering(model, 2, v, 2.0, positions=positions), torch.no_grad():
                alone.append(torch.stack(model.generate(ids, **kw).logits, 1))
        with steerops.Steering(model, 2, v, 2.0, positions=positions), torch.no_grad():
            together = [torch.stack(model.generate(ids, **kw).logits, 1)
                        for ids in (first, second)]
        for a, b in zip(alone, together):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_uncached_generation_keeps_its_prompt_across_steps():
    model = causal_lm("gpt2", seed=3)
    ids = prompts(batch=2, length=6, seed=5)
    v = torch.randn(32) * 4
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with steerops.Steering(model, 2, v, 2.0, positions="generated"), torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pass_wrapper", [False, True])
def test_steering_a_model_compiled_before_attach(pass_wrapper):
    model = causal_lm("llama")
    ids = prompts()
    v = torch.randn(32) * 5
    with torch.no_grad():
        base = model(ids).logits
    with steerops.Steering(model, 1, v, 1.0, positions=[1, -1]), torch.no_grad():
        want = model(ids).logits
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, base)  # compiled without hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time cache reset warns
        with steerops.Steering(compiled if pass_wrapper else model, 1, v, 1.0,
                               positions=[1, -1]), torch.no_grad():
            got = compiled(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # detached: the compiled model is plain again
        torch.testing.assert_close(compiled(ids).logits, base)


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ops_refuse_non_finite_vector_alpha_direction(bad):
    h = torch.randn(4, 8)
    v = torch.randn(8)
    v_bad = v.clone()
    v_bad[3] = bad
    with pytest.raises(ValueError, match="vector has NaN or Inf"):
        steerops.steer(h, v_bad, 1.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        steerops.steer(h, v, bad)
    with pytest.raises(ValueError, match="alpha has NaN or Inf"):
        steerops.steer(h, v, torch.tensor([1.0, bad, 1.0, 1.0]))
    idx = torch.tensor([1])
    with pytest.raises(ValueError, match="direction has NaN or Inf"):
        steerops.patch(h, torch.randn(4, 8), idx, idx, direction=v_bad)
    before = h.clone()
    with pytest.raises(ValueError):
        steerops.steer_(h, v_bad, 1.0)
    assert torch.equal(h, before)  # nothing written


def test_steering_refuses_non_finite_and_meta_inputs():
    model = causal_lm("llama")
    v = torch.randn(32)
    v_nan = v.clone()
    v_nan[0] = float("nan")
    with pytest.raises(ValueError, match="vector has NaN or Inf"):
        steerops.Steering(model, 1, v_nan)
    with pytest.raises(ValueError, match="alpha must be finite"):
        steerops.Steering(model, 1, v, float("inf"))
    with pytest.raises(ValueError, match="alpha has NaN"):
        steerops.Steering(model, 1, v, torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="meta device"):
        steerops.Steering(model, 1, torch.empty(32, device="meta"))
    with pytest.raises(ValueError, match="positions is empty"):
        steerops.Steering(model, 1, v, positions=[])


@pytest.mark.parametrize("positions", [[20], [-9], [2, 8]])
def test_steering_positions_outside_the_prompt_are_an_error(positions):
    model = causal_lm("llama")
    with steerops.Steering(model, 1, torch.randn(32), positions=positions), torch.no_grad():
        with pytest.raises(ValueError, match="outside the 8-token prompt"):
            model(prompts(length=8))


def _pairs():
    clean = prompts(3, 6, seed=11)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 7) % (V - 1) + 1
    return clean, corrupt


def test_metric_must_return_one_value_per_row():
    model = causal_lm("llama")
    clean, corrupt = _pairs()
    for sweep in (steerops.patching_sweep, steerops.attribution_patching):
        with pytest.raises(ValueError, match=r"one value per row of logits, shape \(3,\)"):
            sweep(model, clean, corrupt, lambda logits: logits[:, -1, 3].mean())
        with pytest.raises(ValueError, match="one value per row"):
            sweep(model, clean, corrupt, lambda logits: logits[:, -1, :5])


def test_logit_diff_answers_must_match_pairs_and_vocabulary():
    model = causal_lm("llama")
    clean, corrupt = _pairs()
    with pytest.raises(ValueError, match="answer has 2 entries and wrong has 3"):
        steerops.logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4, 5]))
    two = steerops.logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    for sweep in (steerops.patching_sweep, steerops.attribution_patching):
        with pytest.raises(ValueError, match="built with 2 answers .* there are 3 pairs"):
            sweep(model, clean, corrupt, two)
    outside = steerops.logit_diff(torch.tensor([1, 2, V + 4]), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {V}\)"):
        steerops.patching_sweep(model, clean, corrupt, outside)
    with pytest.raises(ValueError, match="answer must be an int or a 1-D integer"):
        steerops.logit_diff(torch.tensor([1.5]), 2)


def test_identical_clean_and_corrupt_is_an_error_not_nan():
    model = causal_lm("llama")
    clean, _ = _pairs()
    metric = steerops.logit_diff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    for sweep in (steerops.patching_sweep, steerops.attribution_patching):
        with pytest.raises(ValueError, match="do not differ on this metric"):
            sweep(model, clean, clean.clone(), metric)


def test_float_input_ids_are_an_error():
    model = causal_lm("llama")
    with pytest.raises(TypeError, match="input_ids must be integer token ids"):
        steerops.cache_activations(model, prompts().float())
    clean, corrupt = _pairs()
    metric = steerops.logit_diff(1, 2)
    with pytest.raises(TypeError, match="corrupt: input_ids must be integer"):
        steerops.patching_sweep(model, clean, corrupt.float(), metric)


def test_learning_from_identical_pairs_is_an_error():
    model = causal_lm("llama")
    ids = prompts()
    for method in ("mean_diff", "pca"):
        with pytest.raises(ValueError, match="steering vector would be zero"):
            steerops.learn_steering_vector(model, ids, ids.clone(), layer=1, method=method)


# ----------------------------------------------------------------------------- outputs, CLI


def test_results_json_is_strict():
    from steerops.bench.provenance import save_results

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        save_results(out, "r", {"a": float("nan"), "b": [1.0, float("inf")],
                                "c": torch.tensor([0.5, float("-inf")]), "d": {"e": 2}}, "t")
        with open(f"{out}/r.json") as f:
            data = json.loads(f.read(), parse_constant=refuse)
    assert data == {"a": None, "b": [1.0, None], "c": [0.5, None], "d": {"e": 2}}


def test_cli_help_lists_commands_and_exits_zero(capsys):
    from steerops.app.cli import main
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("bench", "attribution", "kernels", "overhead"):
        assert name in out
    for name, module in (("attribution", "attribution"), ("kernels", "kernels"),
                         ("overhead", "overhead"), ("compile", "compile_check"),
                         ("patching", "patching")):
        with pytest.raises(SystemExit) as e:
            main(["bench", name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: steerops bench {name}")
        module = importlib.import_module(f"steerops.bench.{module}")
        for action in module.build_parser()._actions:  # every option has help text
            assert action.help, action.option_strings
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().err  # a command is required
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2


def test_training_script_does_not_overwrite_the_shipped_checkpoints():
    from steerops.bench import train
    with pytest.raises(SystemExit):
        train.main(["--tasks", "ioi", "--out", train.CHECKPOINT_DIR])
    assert math.isfinite(float(len(train.DEFAULT_OUT)))
    assert train.DEFAULT_OUT != train.CHECKPOINT_DIR


def test_compiled_decode_path_runs_no_hook_code_and_matches_eager():
    """model.compile(): the steering hook is traced into the graph, so a steered
    generate runs none of its Python per token, and gives the eager steered tokens."""
    from steerops.bench.overhead import _python_calls
    model = causal_lm("llama", seed=2)
    ids = prompts(batch=2, length=5, seed=1)
    v = torch.randn(32) * 4
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    steering = steerops.Steering(model, 2, v, 3.0)

    def generate():
        with torch.no_grad():
            return model.generate(ids, **kw)
    with steering:
        eager = generate()
        assert _python_calls(generate, "steer_site") == 6  # one per forward (6 tokens), eager
    plain = generate()
    assert not torch.equal(plain, eager)  # the steering changes the tokens
    # dynamo keeps its compiled code (and counts recompiles against its limit) per code
    # object, shared by every llama in the process: start from empty caches, so that
    # models compiled by earlier tests do not use up this one's recompiles
    torch.compiler.reset()
    try:
        model.compile(backend="eager", dynamic=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with steering:
                assert torch.equal(generate(), eager)
                # torch 2.10 with transformers 4.48's cache: dynamo's recompile limit
                # (8) is hit on the decoder layer's guards (layer_idx, the cache list's
                # length), so one forward of each generate runs the layer, and the hook's
                # Python, eagerly; the tokens are still exact. torch 2.13: none
                calls = _python_calls(generate, "steer_site")
                assert calls == 0 or (OLD_TORCH and calls == 1), calls
                assert torch.equal(generate(), eager)
            assert torch.equal(generate(), plain)  # detached: unsteered again
    finally:
        torch.compiler.reset()


def test_fast_steering_path_equals_the_op():
    """'add' at every position with a fixed alpha adds a precomputed alpha * v in place;
    the result equals the fused op's (bitwise, fp32), padding columns untouched."""
    model = causal_lm("llama", seed=2)
    ids = prompts(batch=3, length=6, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in row 0
    v = torch.randn(32)
    for alpha in (2.5, torch.tensor([1.0, -2.0, 0.5])):
        captured = {}
        h = blocks.register_site_hook(
            model, 2, lambda x: captured.setdefault("h", x.clone()))
        with torch.no_grad():
            model(ids, attention_mask=mask)
        h.remove()
        steering = steerops.Steering(model, 2, v, alpha)
        assert steering._fast_path_applies(2)
        got = {}
        with steering, torch.no_grad():
            h = blocks.register_site_hook(
                model, 2, lambda x: got.setdefault("h", x.clone()))
            model(ids, attention_mask=mask)
            h.remove()
        a = alpha[:, None] if isinstance(alpha, torch.Tensor) else alpha
        want = steerops.steer(captured["h"], v, a, mask=mask.bool())
        assert torch.equal(got["h"], want)
        assert torch.equal(got["h"][0, :2], captured["h"][0, :2])
