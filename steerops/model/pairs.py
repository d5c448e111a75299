"""Prompt pairs built once: the clean and corrupt inputs (token ids, padding, attention
mask, position ids), the metric with its answers resolved, and the token strings that
label positions. Text is tokenised here and nowhere else in a call: ``patching_sweep``,
``plan_sweep`` and ``attribution_patching`` take a :class:`PromptPairs` in place of
(clean, corrupt, metric), and the commands build one to check their inputs and then
hand that same record to the sweep."""
from dataclasses import dataclass
from typing import Optional

from . import text
from .metrics import bind_metric


@dataclass(frozen=True)
class PromptPairs:
    """``clean`` / ``corrupt``: the two batches (token ids, or input dicts), aligned pair
    by pair; ``metric``: the metric, text answers resolved, and on a right-padded batch
    its negative positions counted from each pair's last real token; ``tokens``:
    (clean token strings, corrupt token strings) per pair, or None without a tokenizer."""
    clean: object
    corrupt: object
    metric: object
    tokens: Optional[tuple] = None

    @classmethod
    def build(cls, clean, corrupt, metric, *, tokenizer=None, model=None, device=None):
        """Encodes text prompts with ``tokenizer`` (prompts of a pair must tokenise to one
        length; pairs of different lengths are padded on the tokenizer's side), labels
        token ids with their strings, and resolves the metric's text answers."""
        text.check_prompt_list(clean, "clean")
        text.check_prompt_list(corrupt, "corrupt")
        if text.is_text(clean) or text.is_text(corrupt):
            if not (text.is_text(clean) and text.is_text(corrupt)):
                raise TypeError("clean and corrupt must both be text or both be token ids")
            clean, corrupt = text.encode_pairs(tokenizer, clean, corrupt, device, model)
        elif tokenizer is not None:
            clean, corrupt = text.label_pairs(tokenizer, clean, corrupt)
        last = text.right_pad_last(clean)
        if last is not None and getattr(metric, "spec", None) is None:
            raise ValueError("a custom metric on a right-padded batch would read padding at "
                             "the end of the shorter prompts: pad on the left "
                             "(tokenizer.padding_side = 'left'), or use logit_diff / "
                             "prob_diff, whose positions count from each pair's last real "
                             "token")
        metric = bind_metric(metric, tokenizer, last)
        tokens = None
        if getattr(clean, "tokens", None) is not None:
            tokens = (clean.tokens, corrupt.tokens)
        return cls(clean, corrupt, metric, tokens)

    def on(self, model, device):
        """The record on ``device`` for ``model``: tensors moved, and position ids added
        to a padded batch when the model takes them (as encoding with the model does)."""
        return PromptPairs(text.to_model(self.clean, model, device),
                           text.to_model(self.corrupt, model, device),
                           self.metric, self.tokens)


def prompt_pairs(model, tokenizer, clean, corrupt, metric, device):
    """The :class:`PromptPairs` of a call: ``clean`` itself when it is one (then
    ``corrupt`` and ``metric`` are None: the record holds them), else built here."""
    if isinstance(clean, PromptPairs):
        if corrupt is not None or metric is not None:
            raise TypeError("clean is a PromptPairs, which holds the corrupt prompts and the "
                            "metric: pass corrupt=None and metric=None")
        return clean.on(model, device)
    if corrupt is None or metric is None:
        raise TypeError("corrupt and metric are required unless clean is a PromptPairs")
    return PromptPairs.build(clean, corrupt, metric, tokenizer=tokenizer, model=model,
                             device=device)
