"""Which tokens a steered forward touches: the position bookkeeping of
:class:`~steerops.Steering`, apart from hooks and models so it can be tested alone.

A forward sees ``T`` new tokens after ``past`` cached ones; the prompt it belongs
to is ``prompt_len`` tokens long (decode steps extend it). ``SteeredPositions``
turns the user's ``positions`` argument into a (1, T) or (B, T) bool mask of the
columns to steer, or None for all of them.
"""
import torch

POSITION_MODES = ("all", "prompt", "generated")


class SteeredPositions:
    """``positions``: 'all', 'prompt' (tokens of the prompt), 'generated' (every
    later token), explicit prompt positions (an int or a list; negative ones count
    back from the prompt's end; one outside the prompt is an error when a forward
    meets it), or a (batch, seq) bool mask over absolute positions."""

    def __init__(self, positions, device=None):
        self.value = self._check(positions, device)
        # explicit positions: their range as ints, checked against each prompt's length
        self.range = ((int(self.value.min()), int(self.value.max()))
                      if isinstance(self.value, torch.Tensor) and self.value.dtype != torch.bool
                      else None)

    @staticmethod
    def _check(positions, device):
        if isinstance(positions, str):
            if positions not in POSITION_MODES:
                raise ValueError(f"positions must be one of {POSITION_MODES}, explicit "
                                 f"positions or a (batch, seq) bool mask; got {positions!r}")
            return positions
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
            if positions.dim() != 2:
                raise ValueError("a positions mask must be (batch, seq) bool")
            return positions.to(device)
        if isinstance(positions, int) and not isinstance(positions, bool):
            positions = [positions]
        pos = torch.as_tensor(positions, device=device)
        if pos.numel() == 0:
            raise ValueError("positions is empty: nothing would be steered")
        if pos.dim() != 1 or pos.is_floating_point() or pos.dtype == torch.bool:
            raise ValueError("positions must be 'all', 'prompt', 'generated', ints, or a "
                             "(batch, seq) bool mask")
        return pos.long()

    @property
    def steers_everything(self):
        return isinstance(self.value, str) and self.value == "all"

    def mask(self, B, T, past, prompt_len, device):
        """(B, T) or (1, T) bool of the steered columns of a forward over tokens
        ``past .. past + T - 1`` of a prompt of ``prompt_len`` tokens (None: the
        forward is not known to belong to a prompt; it is one prompt), or None
        when every column is steered."""
        p = self.value
        if self.steers_everything:
            return None
        if prompt_len is None:  # blocks called without the top-level model: one prompt
            prompt_len = past + T
        pos = torch.arange(past, past + T, device=device)
        if isinstance(p, str):
            sel = pos < prompt_len if p == "prompt" else pos >= prompt_len
            return sel.unsqueeze(0)
        if p.dtype == torch.bool:
            cols = p[:, past:past + T]
            if cols.shape[0] != B:
                raise ValueError(f"positions mask has {cols.shape[0]} rows, batch has {B}")
            if cols.shape[1] < T:
                cols = torch.cat([cols, cols.new_zeros(B, T - cols.shape[1])], 1)
            return cols
        lo, hi = self.range
        if lo < -prompt_len or hi >= prompt_len:
            raise ValueError(
                f"positions {p.tolist()} fall outside the {prompt_len}-token prompt "
                f"(valid: -{prompt_len} .. {prompt_len - 1}); they would steer nothing. Use "
                f"positions='generated' or a (batch, seq) bool mask for generated tokens.")
        absolute = torch.where(p < 0, p + prompt_len, p)
        return (pos.unsqueeze(1) == absolute.unsqueeze(0)).any(1).unsqueeze(0)
