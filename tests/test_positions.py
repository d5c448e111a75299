"""Steering's position bookkeeping on its own: which columns a forward steers, for
prompt forwards, decode steps (a KV cache of ``past`` tokens) and uncached
re-runs, without a model."""
import pytest
import torch

from steerops.model.positions import SteeredPositions


def cols(mask, T):
    """The steered columns of a (1, T) mask (None = all)."""
    return list(range(T)) if mask is None else mask[0].nonzero().flatten().tolist()


def test_all_steers_every_column():
    assert SteeredPositions("all").mask(2, 5, 0, 5, "cpu") is None
    assert SteeredPositions("all").steers_everything


def test_prompt_and_generated_split_at_the_prompt_length():
    prompt, generated = SteeredPositions("prompt"), SteeredPositions("generated")
    # the prompt forward: 6 tokens, nothing cached
    assert cols(prompt.mask(1, 6, 0, 6, "cpu"), 6) == [0, 1, 2, 3, 4, 5]
    assert cols(generated.mask(1, 6, 0, 6, "cpu"), 6) == []
    # a decode step: one new token after 7 cached ones of a 6-token prompt
    assert cols(prompt.mask(1, 1, 7, 6, "cpu"), 1) == []
    assert cols(generated.mask(1, 1, 7, 6, "cpu"), 1) == [0]
    # an uncached re-run of prompt + 3 generated tokens
    assert cols(generated.mask(1, 9, 0, 6, "cpu"), 9) == [6, 7, 8]
    # no prompt known (blocks called directly): the forward is one prompt
    assert cols(prompt.mask(1, 4, 0, None, "cpu"), 4) == [0, 1, 2, 3]


def test_explicit_positions_count_back_from_the_prompt_end():
    last = SteeredPositions(-1)
    assert cols(last.mask(1, 6, 0, 6, "cpu"), 6) == [5]
    assert cols(last.mask(1, 1, 6, 6, "cpu"), 1) == []  # decode: not a prompt token
    both = SteeredPositions([0, -2])
    assert cols(both.mask(1, 6, 0, 6, "cpu"), 6) == [0, 4]
    assert both.range == (-2, 0)
    with pytest.raises(ValueError, match="outside the 3-token prompt"):
        SteeredPositions([4]).mask(1, 3, 0, 3, "cpu")


def test_a_bool_mask_is_read_at_absolute_positions():
    m = torch.zeros(2, 8, dtype=torch.bool)
    m[0, 1] = m[1, 6] = True
    sp = SteeredPositions(m)
    full = sp.mask(2, 8, 0, 5, "cpu")
    assert full.shape == (2, 8) and full.nonzero().tolist() == [[0, 1], [1, 6]]
    step = sp.mask(2, 1, 6, 5, "cpu")  # decode step at absolute position 6
    assert step.tolist() == [[False], [True]]
    beyond = sp.mask(2, 2, 7, 5, "cpu")  # past the mask's end: not steered
    assert beyond.tolist() == [[False, False], [False, False]]
    with pytest.raises(ValueError, match="positions mask has 2 rows, batch has 3"):
        sp.mask(3, 8, 0, 5, "cpu")


@pytest.mark.parametrize("bad,match", [
    ("middle", "positions must be one of"), ([], "positions is empty"),
    ([0.5], "positions must be"), (torch.zeros(3, dtype=torch.bool), "must be \\(batch, seq\\)"),
])
def test_bad_positions_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SteeredPositions(bad)
