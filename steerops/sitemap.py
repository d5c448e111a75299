"""Shared views of a (layers, positions) map of per-site values: the top sites and
a heatmap."""
import torch


class SiteMap:
    """Shared views of a (layers, positions) map of per-site values."""

    def _values(self):
        raise NotImplementedError

    def top_sites(self, k=10):
        """The k sites with the largest values: [(layer, position, value), ...]
        (a NaN value, if any, ranks last)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int (how many sites), got {k!r}")
        values = self._values().detach().float().cpu()
        flat = values.flatten()
        key = torch.where(torch.isnan(flat), torch.full_like(flat, -float("inf")), flat)
        order = torch.argsort(key, descending=True, stable=True)
        order = torch.cat([order[~torch.isnan(flat[order])], order[torch.isnan(flat[order])]])[:k]
        P = values.shape[1]
        pos = self.positions.tolist()
        return [(self.layers[i // P], pos[i % P], float(flat[i])) for i in order.tolist()]

    def position_labels(self):
        """The x-axis labels: each position's token (with a tokenizer), else its index."""
        return position_labels(getattr(self, "tokens", None), self.positions.tolist())

    def plot(self, path=None, title=None, ax=None):
        """Heatmap of the map (layers x positions, labelled with the prompt's tokens
        when the result has them); saved to ``path`` if given."""
        import matplotlib
        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        values = self._values().detach().float().cpu()
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(2.2 + 0.42 * values.shape[1],
                                            2.0 + 0.38 * values.shape[0]))
        draw_heatmap(ax, values, self.layers, self.position_labels(),
                     title or type(self).__name__, "value")
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=130)
                plt.close(fig)
        return ax


def draw_heatmap(ax, values, layers, labels, title, value_name):
    """layers (y, layer 0 at the bottom) x positions (x, labelled), diverging colours
    centred at 0, a labelled colourbar."""
    values = values.numpy() if hasattr(values, "numpy") else values
    finite = abs(values[~(values != values)]) if values.size else values
    lim = float(finite.max()) if finite.size and float(finite.max()) > 0 else 1.0
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower",
                   interpolation="nearest")
    ax.set_xticks(range(values.shape[1]), labels, rotation=90)
    ax.set_yticks(range(values.shape[0]), layers)
    ax.set(xlabel="position (token)", ylabel="layer", title=title)
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
