"""Patching sweeps with reuse (steerops.sweeps.reuse) equal the plain batched sweep on
every supported causal family: identical sites skipped, the base run's KV-cache
prefix, blocks before the site skipped, LM head at the last position only."""
import pytest
import torch

import steerops
from hf_models import CAUSAL, V, bert, causal_lm, prompts

ARCHS = list(CAUSAL)


def _pairs(batch=3, length=7, padded=False):
    clean = prompts(batch, length, seed=11)
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 7) % (V - 1) + 1   # first difference at column 3
    corrupt[:, 5] = (clean[:, 5] + 3) % (V - 1) + 1
    if not padded:
        return clean, corrupt
    mask = torch.ones_like(clean)
    mask[0, :2] = 0   # left padding on one row
    return {"input_ids": clean, "attention_mask": mask}, \
        {"input_ids": corrupt, "attention_mask": mask}


LAST = steerops.logit_diff(torch.tensor([3, 4, 5]), torch.tensor([9, 10, 11]))


def every_position(logits, pair_index):
    """Reads many positions (no head slicing): every non-padding one. (At padding
    positions transformers unmasks attention, so their logits see later tokens
    and are not causal; steerops.sweeps.reuse documents that they are the base run's.)"""
    return logits[:, 2:, 3].mean(1) - logits[:, 2, 7]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padded", [False, True])
def test_reuse_equals_the_plain_sweep(arch, padded):
    model = causal_lm(arch)
    clean, corrupt = _pairs(padded=padded)
    for noising in (False, True):
        for metric in (LAST, every_position):
            ref = steerops.patching_sweep(model, clean, corrupt, metric, reuse="none",
                                          noising=noising, progress=False)
            for reuse in ("full", "prefix"):
                got = steerops.patching_sweep(model, clean, corrupt, metric, reuse=reuse,
                                              noising=noising, batch_size=2, progress=False)
                torch.testing.assert_close(got.raw, ref.raw, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got.effects, ref.effects, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(got.clean_metric, ref.clean_metric)


def test_reuse_report_and_work_done():
    model = causal_lm("llama")
    clean, corrupt = _pairs()
    L, T, pairs = 3, 7, 3
    res = steerops.patching_sweep(model, clean, corrupt, LAST, reuse="full", progress=False)
    rep = res.extra["reuse"]
    assert rep["mode"] == "full" and rep["lm_head_last_only"] and rep["prefix_from_cache"]
    # identical in clean and corrupt: positions 0..2 at every layer, and at the
    # embeddings (layer 0) also the unchanged tokens 4 and 6
    computed = [(0, 3), (0, 5)] + [(l, p) for l in range(1, L + 1) for p in range(3, T)]
    assert rep["identical_sites_skipped"] == ((L + 1) * T - len(computed)) * pairs
    assert rep["token_layers_plain"] == pairs * (L + 1) * T * T * L
    if rep["layers_skipped"]:  # blocks return their hidden state alone
        # every computed site runs exactly (L - l) layers over (T - p) tokens
        want = sum(pairs * (L - l) * (T - p) for l, p in computed)
        assert rep["token_layers_run"] == want <= rep["token_layers_floor"]
    plain = steerops.patching_sweep(model, clean, corrupt, LAST, reuse="none", progress=False)
    assert plain.extra["reuse"]["mode"] == "none"
    assert res.forwards < plain.forwards * 10  # sanity: one forward per computed site group


def test_encoders_refuse_reuse_and_auto_falls_back():
    model = bert()
    clean, corrupt = _pairs()
    metric = lambda h: h[:, -1, 0]  # noqa: E731  (a BertModel: last hidden state)
    res = steerops.patching_sweep(model, clean, corrupt, metric, layers=[1], progress=False)
    assert res.extra["reuse"]["mode"] == "none"
    with pytest.raises(ValueError, match="needs a causal LM"):
        steerops.patching_sweep(model, clean, corrupt, metric, reuse="full", progress=False)
    with pytest.raises(ValueError, match="reuse must be one of"):
        steerops.patching_sweep(causal_lm("llama"), clean, corrupt, LAST, reuse="yes")


def test_patching_benchmark_forms_agree_and_count(monkeypatch, tmp_path):
    """`steerops bench patching` on a tiny model: the four forms compute the same
    raw values, the reuse form's analytic FLOPs match FlopCounterMode, and the
    report is written after each config."""
    from steerops.bench import patching as PB
    monkeypatch.setattr(PB, "build_model", lambda kind, device: causal_lm("llama"))
    monkeypatch.setattr(PB, "CONFIGS", {"tiny T=6": ("llama", 6)})
    threads = torch.get_num_threads()
    try:
        assert PB.main(["--pairs", "2", "--repeats", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it explicitly
    import json
    data = json.loads((tmp_path / "patching.json").read_text())
    c = data["configs"][0]
    assert data["threads"] == 1 and c["sites"] == 4 * 6
    for form in ("auto", "reuse", "plain", "hook_one_site", "hook_batched_layer"):
        e = c["forms"][form]
        assert e["max_abs_diff_vs_plain"] < 1e-4, form
        assert len(e["runs"]) == 2 and e["sites_per_s"] > 0
        # interleaved rounds: the ratio to reuse is taken round by round
        assert e["over_reuse"]["per_round"] == pytest.approx(
            [a / b for a, b in zip(e["runs"], c["forms"]["reuse"]["runs"])])
    assert c["auto_chose"] in ("full", "none") and c["floor_s"] > 0
    assert c["forms"]["reuse"]["over_floor_s"] == pytest.approx(
        c["forms"]["reuse"]["median_s"] / c["floor_s"])
    assert c["flops_reuse_analytic"] == pytest.approx(c["forms"]["reuse"]["flops_run"], rel=0.25)
    assert c["forms"]["reuse"]["flops_run"] < c["forms"]["plain"]["flops_run"]
    assert "| tiny T=6 |" in (tmp_path / "patching.md").read_text()


def test_benchmark_rounds_interleave_and_rotate():
    from steerops.bench.sweep_timing import interleaved, round_ratios
    calls = []
    forms = {f: (lambda f=f: calls.append(f) or f) for f in ("a", "b", "c")}
    times, results = interleaved(forms, 3, torch.device("cpu"))
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert results == {"a": "a", "b": "b", "c": "c"} and all(len(t) == 3 for t in times.values())
    times = {"x": [2.0, 4.0, 9.0], "y": [1.0, 1.0, 3.0]}
    assert round_ratios(times, "x", "y") == {"median": 3.0, "min": 2.0, "max": 4.0,
                                             "per_round": [2.0, 4.0, 3.0]}
