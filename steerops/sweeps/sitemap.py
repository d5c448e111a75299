"""Shared views of a map of per-site values (any site kind): the top sites and a
heatmap."""
import torch


class SiteMap:
    """Shared views of a map of per-site values over the axes of its site kind:
    (layer, position) for the residual stream, (block, position) for attn_out /
    mlp_out / resid_mid, (block, head, position) or (block, head) for head_out,
    (block, position, neuron) for neurons (steerops.model.sites)."""

    def _values(self):
        raise NotImplementedError

    def axes(self):
        """The names of the map's axes, e.g. ('block', 'head', 'position')."""
        from ..model.sites import site_kind
        return site_kind(getattr(self, "sites", "resid")).axes(
            getattr(self, "per_position", True))

    def coordinates(self):
        """Per axis, the value each index stands for (layers, positions, head or
        neuron numbers)."""
        sizes = self._values().shape
        out = []
        for name, n in zip(self.axes(), sizes):
            out.append(list(self.layers) if name in ("layer", "block") else
                       self.positions.tolist() if name == "position" else list(range(n)))
        return out

    def top_sites(self, k=10):
        """The k sites with the largest values, as (coordinates..., value): (layer,
        position, value) on the residual stream, (block, head, position, value) for
        heads (a NaN value, if any, ranks last)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int (how many sites), got {k!r}")
        values = self._values().detach().float().cpu()
        flat = values.flatten()
        key = torch.where(torch.isnan(flat), torch.full_like(flat, -float("inf")), flat)
        order = torch.argsort(key, descending=True, stable=True)
        order = torch.cat([order[~torch.isnan(flat[order])], order[torch.isnan(flat[order])]])[:k]
        coords = self.coordinates()
        out = []
        for i in order.tolist():
            index = torch.unravel_index(torch.tensor(i), values.shape)
            out.append(tuple(c[int(x)] for c, x in zip(coords, index)) + (float(flat[i]),))
        return out

    def position_labels(self):
        """The x-axis labels: each position's token (with a tokenizer), else its index."""
        return position_labels(getattr(self, "tokens", None), self.positions.tolist())

    def heatmap_values(self):
        """The map as a 2-D heatmap: (rows, columns, row labels, column labels, row axis,
        column axis, note). Heads by position stack as rows 'block.head'; neurons are
        summed over the neuron axis (their AtP sum is the MLP output's)."""
        values = self._values().detach().float().cpu()
        axes, coords = self.axes(), self.coordinates()
        if axes[-1] == "neuron":
            return (values.sum(-1), coords[0], self.position_labels(), axes[0],
                    "position (token)", "summed over neurons")
        if len(axes) == 3:  # (block, head, position)
            rows = [f"{b}.{h}" for b in coords[0] for h in coords[1]]
            return (values.flatten(0, 1), rows, self.position_labels(), "block.head",
                    "position (token)", "")
        if axes[-1] == "head":
            return values, coords[0], [str(h) for h in coords[1]], axes[0], "head", ""
        return values, coords[0], self.position_labels(), axes[0], "position (token)", ""

    def plot(self, path=None, title=None, ax=None):
        """Heatmap of the map (layers x positions, labelled with the prompt's tokens
        when the result has them; heads as rows 'block.head'); saved to ``path``."""
        import matplotlib
        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        values, rows, columns, row_axis, column_axis, note = self.heatmap_values()
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(2.2 + 0.42 * values.shape[1],
                                            2.0 + 0.38 * values.shape[0]))
        sites = getattr(self, "sites", "resid")
        default = type(self).__name__ + ("" if sites == "resid" else f" ({sites}"
                                         + (f", {note})" if note else ")"))
        draw_heatmap(ax, values, rows, columns, title or default, "value",
                     ylabel=row_axis, xlabel=column_axis)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=130)
                plt.close(fig)
        return ax


def draw_heatmap(ax, values, layers, labels, title, value_name, ylabel="layer",
                 xlabel="position (token)"):
    """layers (y, layer 0 at the bottom) x positions (x, labelled), diverging colours
    centred at 0, a labelled colourbar."""
    values = values.numpy() if hasattr(values, "numpy") else values
    finite = abs(values[~(values != values)]) if values.size else values
    lim = float(finite.max()) if finite.size and float(finite.max()) > 0 else 1.0
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower",
                   interpolation="nearest")
    ax.set_xticks(range(values.shape[1]), labels, rotation=90)
    ax.set_yticks(range(values.shape[0]), layers)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylabel == "block.head":  # a line between blocks
        for i in range(1, len(layers)):
            if str(layers[i]).split(".")[0] != str(layers[i - 1]).split(".")[0]:
                ax.axhline(i - 0.5, color="#555555", linewidth=0.7)
    return ax.figure.colorbar(im, ax=ax, label=value_name)


def display_token(token):
    """A token as a label: a leading space shown as a visible one, newlines escaped."""
    if token is None:
        return ""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    if text.startswith(" "):
        text = "\u2423" + text[1:]
    return text if text.strip() else repr(token)


def position_labels(tokens, positions):
    """One label per requested position: the clean token there when every pair
    has the same one, else the first pair's token and how many others differ."""
    if not tokens:
        return [str(int(p)) for p in positions]
    labels = []
    for p in positions:
        seen = list(dict.fromkeys(row[int(p)] for row in tokens))
        text = display_token(seen[0])
        labels.append(text if len(seen) == 1 else f"{text} (+{len(seen) - 1})")
    return labels
