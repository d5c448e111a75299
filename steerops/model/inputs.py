"""Model inputs of the measuring calls: token ids or dicts of inputs, prompt pairs,
row selection, positions, and the model's output tensor."""
import torch


def as_inputs(inputs, device, name="inputs"):
    """input_ids tensor, or a dict / BatchEncoding of model inputs, on ``device``."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    elif hasattr(inputs, "items"):
        inputs = dict(inputs.items())
    else:
        raise TypeError(f"{name} must be an input_ids tensor or a dict of model inputs, got "
                        f"{type(inputs).__name__}")
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex()
                                          or ids.dtype == torch.bool):
        raise TypeError(f"{name}: input_ids must be integer token ids, got {ids.dtype} "
                        f"(pass float embeddings as inputs_embeds)")
    main = ids if ids is not None else inputs.get("inputs_embeds")
    if isinstance(main, torch.Tensor):
        if main.dim() < 2:
            raise ValueError(f"{name} must be (batch, tokens), got shape {tuple(main.shape)}; "
                             f"add a batch dimension (ids[None]) for one prompt")
        if main.shape[0] == 0 or main.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(main.shape[:2])} (batch, tokens); "
                             f"give at least one prompt of at least one token")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def positive_int(name, value, allow_none=True):
    """A count option (batch size, pairs per unit): None (default) or an int >= 1."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def aligned_pairs(clean, corrupt, device):
    clean, corrupt = as_inputs(clean, device, "clean"), as_inputs(corrupt, device, "corrupt")
    if batch_shape(clean) != batch_shape(corrupt):
        raise ValueError(f"clean and corrupt must have the same shape (aligned pairs), got "
                         f"{batch_shape(clean)} and {batch_shape(corrupt)}")
    return clean, corrupt


def batch_shape(inputs):
    t = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if t is None:
        raise ValueError("inputs need input_ids or inputs_embeds")
    return tuple(t.shape[:2])


def select_rows(inputs, index):
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v)
            for k, v in inputs.items()}


def model_output(out):
    """Logits when the model has an LM head, else its last hidden state."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0] if isinstance(out, (tuple, list)) else out


def resolve_positions(positions, T, device):
    """Column indices (P,) of the requested positions; None = all, negatives from the end."""
    if positions is None:
        return torch.arange(T, device=device)
    pos = torch.as_tensor(positions if not isinstance(positions, int) else [positions])
    if pos.dim() != 1 or pos.is_floating_point():
        raise ValueError("positions must be None, an int or a 1-D list of ints")
    pos = torch.where(pos < 0, pos + T, pos)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= T):
        raise ValueError(f"positions out of range for sequence length {T}")
    return pos.long().to(device)
