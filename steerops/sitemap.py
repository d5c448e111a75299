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

    def plot(self, path=None, title=None, ax=None):
        """Heatmap of the map (layers x positions); saved to ``path`` if given."""
        import matplotlib
        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        values = self._values().detach().float().cpu().numpy()
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(1.2 + 0.45 * values.shape[1],
                                            1.2 + 0.35 * values.shape[0]))
        lim = float(abs(values).max()) or 1.0
        im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(values.shape[1]), self.positions.tolist())
        ax.set_yticks(range(values.shape[0]), self.layers)
        ax.set(xlabel="position", ylabel="layer", title=title or type(self).__name__)
        ax.figure.colorbar(im, ax=ax)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
                plt.close(fig)
        return ax
