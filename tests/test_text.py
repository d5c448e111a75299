"""Text in: prompts and answers as strings with a tokenizer, results labelled with
tokens; equal to the id-based calls bit for bit; padding on either side."""
import pytest
import torch

import steerops
from steerops.model import text
from steerops.app.tiny import TEMPLATE

CLEAN = TEMPLATE.format(a="Mary", b="John", place="store", obj="drink")
CORRUPT = TEMPLATE.format(a="Sarah", b="John", place="store", obj="drink")
CLEAN2 = TEMPLATE.format(a="Tom", b="Kate", place="park", obj="key")
CORRUPT2 = TEMPLATE.format(a="Anna", b="Kate", place="park", obj="key")


def _ids(tok, texts):
    return torch.tensor([tok(t)["input_ids"] for t in texts])


@pytest.mark.parametrize("reuse", ["full", "none"])
def test_sweep_text_equals_ids(tiny, reuse):
    model, tok = tiny
    by_text = steerops.patching_sweep(model, [CLEAN, CLEAN2], [CORRUPT, CORRUPT2],
                                      steerops.logit_diff(["Mary", "Tom"], ["John", "Kate"]),
                                      tokenizer=tok, reuse=reuse, progress=False)
    answer = torch.tensor(tok.convert_tokens_to_ids(["Mary", "Tom"]))
    wrong = torch.tensor(tok.convert_tokens_to_ids(["John", "Kate"]))
    by_ids = steerops.patching_sweep(model, _ids(tok, [CLEAN, CLEAN2]),
                                     _ids(tok, [CORRUPT, CORRUPT2]),
                                     steerops.logit_diff(answer, wrong), reuse=reuse,
                                     progress=False)
    assert torch.equal(by_text.effects, by_ids.effects)
    assert torch.equal(by_text.raw, by_ids.raw)
    assert by_text.tokens[0] == CLEAN.split() and by_text.corrupt_tokens[1] == CORRUPT2.split()
    assert by_ids.tokens is None
    assert by_text.position_labels()[1] == "Mary (+1)" and by_text.position_labels()[0] == "When"


def test_single_string_pair_and_resolved_answers(tiny):
    model, tok = tiny
    bound = steerops.logit_diff("Mary", "John", tokenizer=tok)
    unbound = steerops.logit_diff("Mary", "John")
    a = steerops.patching_sweep(model, CLEAN, CORRUPT, bound, tokenizer=tok, progress=False)
    b = steerops.patching_sweep(model, CLEAN, CORRUPT, unbound, tokenizer=tok, progress=False)
    assert torch.equal(a.effects, b.effects)
    assert a.tokens == [CLEAN.split()]
    top = a.top_sites(3)
    assert {(layer, pos) for layer, pos, _ in top} >= {(0, 1)}  # the swapped name matters


def test_attribution_and_cache_text_equal_ids(tiny):
    model, tok = tiny
    metric = steerops.prob_diff("Mary", "John")
    by_text = steerops.attribution_patching(model, CLEAN, CORRUPT, metric, tokenizer=tok)
    ids_metric = steerops.prob_diff(*tok.convert_tokens_to_ids(["Mary", "John"]))
    by_ids = steerops.attribution_patching(model, _ids(tok, [CLEAN]), _ids(tok, [CORRUPT]),
                                           ids_metric)
    assert torch.equal(by_text.scores, by_ids.scores)
    assert by_text.tokens == [CLEAN.split()]
    cache = steerops.cache_activations(model, [CLEAN, CORRUPT], [1, 2], tokenizer=tok)
    ref = steerops.cache_activations(model, _ids(tok, [CLEAN, CORRUPT]), [1, 2])
    assert torch.equal(cache.acts, ref.acts) and cache.tokens[1] == CORRUPT.split()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("reuse", ["full", "none"])
def test_padding_either_side(tiny, side, reuse):
    """Pairs of different lengths are padded on the tokenizer's side; each pair's
    effects equal its own unpadded sweep (the metric reads its last real token)."""
    model, tok = tiny
    tok.padding_side = side
    try:
        short_clean, short_corrupt = "Tom gave a key to", "Kate gave a key to"
        padded = steerops.patching_sweep(model, [CLEAN, short_clean], [CORRUPT, short_corrupt],
                                         steerops.logit_diff(["Mary", "Tom"], ["John", "Kate"]),
                                         tokenizer=tok, reuse=reuse, progress=False)
        alone = steerops.patching_sweep(model, short_clean, short_corrupt,
                                        steerops.logit_diff("Tom", "Kate"), tokenizer=tok,
                                        reuse=reuse, progress=False)
    finally:
        tok.padding_side = "left"
    T, t = padded.raw.shape[2], alone.raw.shape[2]
    cols = slice(T - t, T) if side == "left" else slice(0, t)
    torch.testing.assert_close(padded.raw[1, :, cols], alone.raw[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded.clean_metric[1:], alone.clean_metric, atol=1e-4,
                               rtol=1e-4)
    row = padded.tokens[1]
    assert row[cols] == short_clean.split() and set(row) - set(short_clean.split()) == {"[PAD]"}


def test_learn_and_generate_text(tiny):
    model, tok = tiny
    pos = [TEMPLATE.format(a="Mary", b="John", place=p, obj="key") for p in ("park", "store")]
    neg = [TEMPLATE.format(a="John", b="Mary", place=p, obj="key") for p in ("park", "store")]
    by_text = steerops.learn_steering_vector(model, pos, neg, 2, tokenizer=tok)
    by_ids = steerops.learn_steering_vector(model, _ids(tok, pos), _ids(tok, neg), 2)
    assert torch.equal(by_text.vector, by_ids.vector)
    prompt = TEMPLATE.format(a="Tom", b="Kate", place="park", obj="key")
    steering = steerops.Steering(model, None, by_text, alpha=torch.tensor([0.0, 4.0]))
    plain, steered = steering.generate([prompt, prompt], tok, max_new_tokens=1)
    assert plain == "Tom" and steered == "Mary"
    ids = _ids(tok, [prompt])
    with steerops.Steering(model, None, by_text, alpha=4.0):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                             do_sample=False, pad_token_id=0)
    assert tok.decode(out[0, -1:]) == steered  # text path = ids path


def test_text_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"answer 'Mary John' is 2 tokens \['Mary', 'John'\]"):
        steerops.logit_diff("Mary John", "John", tokenizer=tok)
    with pytest.raises(ValueError, match="wrong 'Zed' is not in the tokenizer's vocabulary"):
        steerops.logit_diff("Mary", "Zed", tokenizer=tok)
    with pytest.raises(ValueError, match=r"answer\[1\] 'a b' is 2 tokens"):
        steerops.patching_sweep(model, [CLEAN, CLEAN2], [CORRUPT, CORRUPT2],
                                steerops.logit_diff(["Mary", "a b"], ["John", "Kate"]),
                                tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="pass tokenizer="):
        steerops.patching_sweep(model, CLEAN, CORRUPT, steerops.logit_diff(1, 2),
                                progress=False)
    ids = _ids(tok, [CLEAN])
    with pytest.raises(ValueError, match="text answers: pass tokenizer="):
        steerops.patching_sweep(model, ids, _ids(tok, [CORRUPT]),
                                steerops.logit_diff("Mary", "John"), progress=False)
    with pytest.raises(ValueError) as info:
        steerops.patching_sweep(model, "When Mary and John went", "When Sarah went",
                                steerops.logit_diff("Mary", "John"), tokenizer=tok,
                                progress=False)
    message = str(info.value)
    assert "pair 0: clean and corrupt tokenise to 5 and 3 tokens" in message
    assert "0: 'When' | 'When', 1*: 'Mary' | 'Sarah'" in message and "2*: 'and' | 'went'" in message
    assert "4*: 'went' | '-'" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"clean has 2 prompts and corrupt has 1"):
        text.encode_pairs(tok, [CLEAN, CLEAN2], [CORRUPT])
    with pytest.raises(ValueError, match=r"clean\[0\] is empty"):
        text.encode_pairs(tok, [" "], [CORRUPT])
    with pytest.raises(TypeError, match="both be text"):
        steerops.patching_sweep(model, CLEAN, ids, steerops.logit_diff("Mary", "John"),
                                tokenizer=tok, progress=False)


class CountingTokenizer:
    """A tokenizer that records the text of every call (to count tokenisations)."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0] if args else kwargs)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def test_prompt_pairs_are_tokenised_once_and_taken_by_the_sweeps(tiny):
    """A PromptPairs record encodes the prompts and resolves the answers once; the sweeps
    take it in place of (clean, corrupt, metric) and tokenise nothing more, with the same
    numbers as from text."""
    from steerops.model.pairs import PromptPairs
    model, tok = tiny
    calls = []
    counting = CountingTokenizer(tok, calls)
    metric = steerops.logit_diff(["Mary", "Tom"], ["John", "Kate"])
    pairs = PromptPairs.build([CLEAN, CLEAN2], [CORRUPT, CORRUPT2], metric, tokenizer=counting)
    encoded = len(calls)
    prompts = [CLEAN, CLEAN2, CORRUPT, CORRUPT2]
    assert sorted(c for c in calls if c in prompts) == sorted(prompts)  # each prompt once
    assert encoded == 8  # and each of the four answers once
    sweep = steerops.patching_sweep(model, pairs, progress=False)
    atp = steerops.attribution_patching(model, pairs)
    assert len(calls) == encoded  # nothing tokenised again
    by_text = steerops.patching_sweep(model, [CLEAN, CLEAN2], [CORRUPT, CORRUPT2], metric,
                                      tokenizer=tok, progress=False)
    assert torch.equal(sweep.effects, by_text.effects) and sweep.tokens == by_text.tokens
    ref = steerops.attribution_patching(model, [CLEAN, CLEAN2], [CORRUPT, CORRUPT2], metric,
                                        tokenizer=tok)
    assert torch.equal(atp.scores, ref.scores)
    with pytest.raises(TypeError, match="clean is a PromptPairs"):
        steerops.patching_sweep(model, pairs, pairs.corrupt, metric)
    with pytest.raises(TypeError, match="corrupt and metric are required"):
        steerops.patching_sweep(model, [CLEAN], None, metric, tokenizer=tok)


def test_learning_and_caching_take_the_pair_record_without_tokenising_again(tiny):
    """learn_steering_vector takes a PromptPairs (clean: positive, corrupt: negative, its
    metric for optimize) and cache_activations its batches: the same numbers as from
    text, and no prompt or answer tokenised again."""
    model, tok = tiny
    short = " ".join(CLEAN.split()[:-3])
    short_corrupt = " ".join(CORRUPT.split()[:-3])
    clean, corrupt = [CLEAN, short], [CORRUPT, short_corrupt]
    metric = steerops.logit_diff(["Mary", "Mary"], ["John", "John"])
    side, tok.padding_side = tok.padding_side, "left"
    try:
        calls = []
        pairs = steerops.PromptPairs.build(clean, corrupt, metric,
                                           tokenizer=CountingTokenizer(tok, calls))
        encoded = len(calls)
        vector = steerops.learn_steering_vector(model, pairs, layer=1)
        by_text = steerops.learn_steering_vector(model, clean, corrupt, 1, tokenizer=tok)
        assert torch.equal(vector.vector, by_text.vector)
        learned = steerops.learn_steering_vector(model, pairs, layer=1, method="optimize",
                                                 steps=3)
        learned_text = steerops.learn_steering_vector(model, clean, corrupt, 1,
                                                      method="optimize", steps=3,
                                                      metric=metric, tokenizer=tok)
        assert torch.allclose(learned.vector, learned_text.vector, atol=1e-6)
        cache = steerops.cache_activations(model, pairs.clean, layers=[1, 2])
        cache_text = steerops.cache_activations(model, clean, layers=[1, 2], tokenizer=tok)
        assert torch.equal(cache.acts, cache_text.acts) and cache.tokens == cache_text.tokens
        assert len(calls) == encoded  # nothing tokenised again
        with pytest.raises(TypeError, match="positive is a PromptPairs"):
            steerops.learn_steering_vector(model, pairs, pairs.corrupt, 1)
        with pytest.raises(TypeError, match="negative is required"):
            steerops.learn_steering_vector(model, clean, layer=1, tokenizer=tok)
        tok.padding_side = "right"
        right = steerops.PromptPairs.build(clean, corrupt, metric, tokenizer=tok)
        with pytest.raises(ValueError, match="position -1: these PromptPairs are padded on "
                                             "the right"):
            steerops.learn_steering_vector(model, right, layer=1)
        at_two = steerops.learn_steering_vector(model, right, layer=1, position=2)
        assert at_two.settings["position"] == 2
    finally:
        tok.padding_side = side
