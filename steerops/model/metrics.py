"""Metrics: ``metric(logits, pair_index) -> (rows,)``, where ``pair_index`` says
which prompt pair each batch row belongs to (a patching batch holds many copies of
one pair, each with a different site patched); callables of ``logits`` alone are
accepted too. :func:`logit_diff` and :func:`prob_diff` are the usual ones. The
checks here turn a metric that cannot give meaningful effects (wrong shape,
integer values, NaN) into a one-line error."""
import inspect

import torch

from .text import answer_ids, is_text


def as_metric(metric):
    """``metric(logits, pair_index)``, checked on every call to return one
    value per row of ``logits``."""
    if not callable(metric):
        raise TypeError("metric must be callable: metric(logits, pair_index) or metric(logits)")
    raw = _two_argument(metric)

    def checked(logits, pair_index):
        value = raw(logits, pair_index)
        rows = logits.shape[0]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (rows,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"metric must return one value per row of logits, shape ({rows},); "
                             f"got {shape}. Reduce over positions/vocabulary inside the metric, "
                             f"not over the batch.")
        if not value.is_floating_point():
            raise TypeError(f"metric must return floating values (e.g. a logit or probability "
                            f"difference), got {value.dtype}: an integer or boolean metric "
                            f"(argmax correctness) has no gradient and no graded effect")
        return value
    checked.num_pairs = getattr(metric, "num_pairs", None)
    checked.positions = getattr(metric, "positions", None)  # logits positions it reads
    return checked


def check_metric_pairs(metric, pairs):
    """A metric built for a number of pairs (logit_diff / prob_diff with one
    answer per pair) must match the pairs it is given."""
    n = getattr(metric, "num_pairs", None)
    if n is not None and n != pairs:
        raise ValueError(f"metric was built with {n} answers (one per pair) but there are "
                         f"{pairs} pairs")


def check_finite_metric(values, run):
    """The metric on a whole run (clean, corrupt, patched) must be finite."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        where = torch.nonzero(bad.reshape(values.shape[0], -1).any(-1)).flatten().tolist()
        raise ValueError(f"metric is NaN or Inf on the {run} run of {len(where)} of "
                         f"{values.shape[0]} pairs (first: pair {where[0]}); effects would be "
                         f"NaN. Use a metric that stays finite (e.g. a logit difference rather "
                         f"than a log of a probability that can reach 0).")


def check_denominator(clean_metric, corrupt_metric):
    """m(clean) - m(corrupt), refusing 0 (effects would be 0/0) and non-finite values."""
    check_finite_metric(clean_metric, "clean")
    check_finite_metric(corrupt_metric, "corrupt")
    denom = (clean_metric - corrupt_metric).mean()
    scale = float(clean_metric.abs().mean() + corrupt_metric.abs().mean()) + 1.0
    if not bool(torch.isfinite(denom)) or abs(float(denom)) <= 1e-7 * scale:
        raise ValueError(
            f"mean metric difference m(clean) - m(corrupt) is {float(denom):.3g}: clean and "
            f"corrupt do not differ on this metric (identical inputs?), so normalised effects "
            f"would be 0/0. Check the pairs and the metric's answer tokens.")
    return denom


def check_finite_sites(raw, layers, pos, what="metric"):
    """``raw`` (pairs, layers, positions) per-site values must be finite: a NaN at
    one site would make its effect NaN (and rank it anywhere)."""
    bad = ~torch.isfinite(raw)
    if bool(bad.any()):
        i, li, *rest = (int(x) for x in torch.nonzero(bad)[0])
        where = f"position {int(pos[rest[0]])}" if len(rest) == 1 else f"site index {tuple(rest)}"
        raise ValueError(
            f"{what} is NaN or Inf at {int(bad.sum())} of {raw.numel()} patched (pair, site) "
            f"rows, first at pair {i}, layer {layers[li]}, {where}: effects "
            f"would be NaN. Use a metric that stays finite under patching (e.g. a logit "
            f"difference rather than a log-probability margin).")


def _two_argument(metric):
    try:
        params = [p for p in inspect.signature(metric).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                         p.POSITIONAL_OR_KEYWORD)]
        takes_index = len(params) >= 2
    except (TypeError, ValueError):
        takes_index = True
    if takes_index:
        return metric
    return lambda logits, pair_index: metric(logits)


def _answer_logits(logits, pair_index, position, tokens):
    """logits[row, position, token] with per-pair (or shared) tokens/positions."""
    B = logits.shape[0]
    rows = torch.arange(B, device=logits.device)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(f"answer/wrong token ids must be in [0, {logits.shape[-1]}) (the "
                         f"vocabulary of these logits), got min {int(tokens.min())} max "
                         f"{int(tokens.max())}")
    tok = tokens.to(logits.device)
    tok = tok.expand(B) if tok.dim() == 0 else tok[pair_index]
    T = logits.shape[1]
    if isinstance(position, int):
        if not -T <= position < T:
            raise ValueError(f"position {position} is outside these logits' {T} positions "
                             f"(valid: -{T} .. {T - 1})")
    else:
        if position.numel() and (int(position.min()) < -T or int(position.max()) >= T):
            raise ValueError(f"position must be in -{T} .. {T - 1} (these logits' positions), "
                             f"got min {int(position.min())} max {int(position.max())}")
        position = position.to(logits.device)[pair_index]
    return logits[rows, position, tok]


def logit_diff(answer, wrong, position=-1, *, tokenizer=None):
    """metric: logit(answer) - logit(wrong) at ``position`` (int, or one per pair).

    ``answer`` / ``wrong``: (pairs,) token ids (or ints shared by all pairs), or
    text: a string (shared) or a list of strings (one per pair), each exactly one
    token, resolved with ``tokenizer`` now or with the measuring call's
    ``tokenizer=``.
    """
    return _answer_metric("logit_diff", answer, wrong, position, tokenizer)


def prob_diff(answer, wrong, position=-1, *, tokenizer=None):
    """metric: p(answer) - p(wrong) at ``position`` (softmax over the vocabulary);
    answers as in :func:`logit_diff`."""
    return _answer_metric("prob_diff", answer, wrong, position, tokenizer)


def _answer_metric(kind, answer, wrong, position, tokenizer):
    spec = (kind, answer, wrong, position)
    if is_text(answer) or is_text(wrong):
        if tokenizer is None:
            return _unresolved(spec)
        answer = answer_ids(tokenizer, answer, "answer") if is_text(answer) else answer
        wrong = answer_ids(tokenizer, wrong, "wrong") if is_text(wrong) else wrong
    answer, wrong, pairs = _pair_tensors(answer, wrong)
    position = position if isinstance(position, int) else torch.as_tensor(position)

    def metric(logits, pair_index):
        if kind == "prob_diff":
            logits = logits.float().softmax(-1)
        return (_answer_logits(logits, pair_index, position, answer)
                - _answer_logits(logits, pair_index, position, wrong))
    metric.num_pairs = pairs
    metric.positions = (position,) if isinstance(position, int) else None
    metric.spec = spec
    metric.answer_ids = (answer, wrong)
    return metric


def _unresolved(spec):
    kind, answer, wrong = spec[:3]

    def metric(logits, pair_index):
        raise ValueError(f"{kind}({answer!r}, {wrong!r}) has text answers: pass tokenizer= to "
                         f"{kind} or to the call that uses it")
    metric.spec = spec
    metric.num_pairs = len(answer) if isinstance(answer, (list, tuple)) else None
    metric.positions = None
    return metric


def bind_metric(metric, tokenizer, last_positions=None):
    """``metric`` with its text answers resolved through ``tokenizer``; a
    logit_diff / prob_diff at a negative position on a right-padded batch counts from
    each pair's last real token (``last_positions``), never from the padding."""
    spec = getattr(metric, "spec", None)
    if spec is None:
        return metric
    kind, answer, wrong, position = spec
    if (is_text(answer) or is_text(wrong)) and tokenizer is None:
        raise ValueError(f"{kind}({answer!r}, {wrong!r}) has text answers: pass tokenizer= to "
                         f"{kind} or to this call")
    if last_positions is not None and isinstance(position, int) and position < 0:
        # counted from each pair's own last real token, never from the padding
        position = last_positions.cpu() + 1 + position
        if bool((position < 0).any()):
            raise ValueError(f"{kind} position {spec[3]}: before the first token of a "
                             f"shorter prompt")
    elif not (is_text(answer) or is_text(wrong)):
        return metric
    return _answer_metric(kind, answer, wrong, position, tokenizer)


def _pair_tensors(answer, wrong):
    answer, wrong = torch.as_tensor(answer), torch.as_tensor(wrong)
    for name, t in (("answer", answer), ("wrong", wrong)):
        if t.is_floating_point() or t.dim() > 1:
            raise ValueError(f"{name} must be an int or a 1-D integer tensor of token ids "
                             f"(one per pair), got {t.dtype} of shape {tuple(t.shape)}")
    if answer.dim() == 1 and wrong.dim() == 1 and answer.numel() != wrong.numel():
        raise ValueError(f"answer has {answer.numel()} entries and wrong has {wrong.numel()}; "
                         f"give one of each per pair")
    same = torch.nonzero(torch.broadcast_to(answer == wrong, (max(
        answer.numel(), wrong.numel()),) if answer.dim() or wrong.dim() else ()).reshape(-1))
    if same.numel():
        i = int(same[0])
        token = int(torch.broadcast_to(answer, (max(answer.numel(), 1),)).reshape(-1)[i]) \
            if answer.dim() else int(answer)
        where = f"at pair {i}" if answer.dim() or wrong.dim() else "for every pair"
        raise ValueError(f"answer and wrong are the same token ({token}) {where}: the metric "
                         f"compares two different answers")
    pairs = next((t.numel() for t in (answer, wrong) if t.dim() == 1), None)
    return answer.long(), wrong.long(), pairs
