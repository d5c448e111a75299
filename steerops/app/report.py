"""Results a person reads: a JSON record of a site map (layers x positions, or any site
kind's map drawn as rows x columns) with the
token string of every position, a PNG heatmap drawn from that record, and a
self-contained HTML report (inline SVG, CSS and a few lines of JavaScript: it
opens with no network, and is small enough to mail).

The HTML is written by hand rather than with a plotting library: a heatmap is
one ``<rect>`` per site, which keeps the file a few tens of kB, gives each cell
its layer, position, token and value as attributes that a test can read, and
adds no dependency (plotly's inlined script alone is ~3.5 MB).
"""
import html
import json
import math

import torch

from ..sweeps.sitemap import display_token, draw_heatmap, position_labels


def site_record(result, kind, settings=None, provenance=None):
    """The JSON-ready record of a PatchingResult / AttributionResult of any site kind:
    the map as drawn (rows x columns: layers x positions on the residual stream,
    'block.head' x positions for heads, neurons summed) and its top sites by the
    kind's own axes."""
    values, rows, columns, row_axis, column_axis, note = result.heatmap_values()
    positions = [int(p) for p in result.positions.tolist()]
    tokens = getattr(result, "tokens", None)
    corrupt = getattr(result, "corrupt_tokens", None)
    labels = position_labels(tokens, positions)
    axes = result.axes()
    top = []
    for *coords, value in result.top_sites(min(10, result._values().numel())):
        site = dict(zip(axes, (int(c) for c in coords)), value=value)
        site["layer"] = site.get("layer", site.get("block"))
        if "position" in site:
            site["token"] = labels[positions.index(site["position"])]
        top.append(site)
    return {
        "kind": kind,
        "sites": getattr(result, "sites", "resid"),
        "axes": list(axes),
        "value_name": "normalised patching effect" if kind == "patching" else "AtP score",
        "layers": [int(x) for x in result.layers],
        "row_labels": [str(r) for r in rows],
        "row_axis": row_axis,
        "column_axis": column_axis,
        "note": note,
        "positions": positions,
        "labels": [str(c) for c in columns],
        "values": [[_finite(v) for v in row] for row in values.tolist()],
        "tokens": {"clean": tokens, "corrupt": corrupt},
        "top_sites": top,
        "clean_metric": [float(x) for x in result.clean_metric.flatten().tolist()],
        "corrupt_metric": [float(x) for x in result.corrupt_metric.flatten().tolist()],
        "settings": settings or {},
        # the plan a patching sweep ran (its form, and why: reuse='auto' times the
        # machine, so two runs may take different forms, equal to float tolerance)
        "plan": getattr(result, "extra", {}).get("plan"),
        "provenance": provenance or {},
    }


def _by_position(rec):
    """Whether the record's columns are token positions (not heads)."""
    return rec.get("column_axis", "position (token)").startswith("position")


def _rows(rec):
    return rec.get("row_labels") or [str(x) for x in rec["layers"]]


def _finite(v):
    return v if math.isfinite(v) else None


def rank_agreement(a, b, k=10):
    """Spearman correlation of two records' values over all sites, and the overlap
    of their top-k sites."""
    x = torch.tensor(a["values"], dtype=torch.float64).flatten()
    y = torch.tensor(b["values"], dtype=torch.float64).flatten()
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    k = min(k, x.numel())
    top_a = set(torch.argsort(x, descending=True)[:k].tolist())
    top_b = set(torch.argsort(y, descending=True)[:k].tolist())
    return {"spearman": float(rx @ ry) / denom if denom else float("nan"),
            "top_k": k, "top_k_overlap": len(top_a & top_b) / k}


def _ranks(x):
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    return ranks


def write_json(record, path):
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def write_png(records, path):
    """One heatmap per record, side by side: tokens on x, layers on y, a diverging
    colour map centred at 0 with a labelled colourbar. Returns the labels drawn
    (x ticks, y ticks, colourbar) per panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    P = len(records[0]["labels"])
    L = len(_rows(records[0]))
    row_inch = 0.38 if L <= 24 else 0.2  # many rows (heads): a smaller step
    fig, axes = plt.subplots(1, len(records), squeeze=False,
                             figsize=(len(records) * (2.2 + 0.42 * P), 2.0 + row_inch * L))
    drawn = []
    for ax, rec in zip(axes[0], records):
        values = torch.tensor([[math.nan if v is None else v for v in row]
                               for row in rec["values"]])
        title = rec["kind"] + ("" if rec.get("sites", "resid") == "resid" else
                               f" ({rec['sites']}{', ' + rec['note'] if rec.get('note') else ''})")
        bar = draw_heatmap(ax, values, _rows(rec), rec["labels"], title, rec["value_name"],
                           ylabel=rec.get("row_axis", "layer"),
                           xlabel=rec.get("column_axis", "position (token)"))
        if L > 24:
            ax.tick_params(axis="y", labelsize=6)
        drawn.append({"x": [t.get_text() for t in ax.get_xticklabels()],
                      "y": [t.get_text() for t in ax.get_yticklabels()],
                      "colorbar": bar.ax.get_ylabel()})
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return drawn


# ---------------------------------------------------------------------- HTML
_BLUE, _WHITE, _RED = (33, 102, 172), (247, 247, 247), (178, 24, 43)


def _colour(value, lim):
    if value is None:
        return "#bbbbbb"
    t = max(-1.0, min(1.0, value / lim)) if lim else 0.0
    end = _RED if t > 0 else _BLUE
    rgb = [round(w + abs(t) * (e - w)) for w, e in zip(_WHITE, end)]
    return "#%02x%02x%02x" % tuple(rgb)


def _svg_heatmap(rec, panel):
    """An SVG heatmap: one rect per site, token labels on x, layers on y, a colourbar."""
    cell_w, cell_h, left, top = 34, 22, 46, 12
    labels, layers, values = rec["labels"], _rows(rec), rec["values"]
    P, L = len(labels), len(layers)
    by_position = _by_position(rec)
    row_axis = rec.get("row_axis", "layer")
    flat = [abs(v) for row in values for v in row if v is not None]
    lim = max(flat) if flat and max(flat) > 0 else 1.0
    label_h = 8 + 6.5 * max((len(s) for s in labels), default=1)
    width = left + P * cell_w + 86
    height = max(top + L * cell_h + label_h + 12, top + 6.5 * len(rec["value_name"]) + 12)
    clean = (rec["tokens"].get("clean") or [None])[0]
    corrupt = (rec["tokens"].get("corrupt") or [None])[0]
    out = [f'<svg class="heatmap" data-panel="{panel}" width="{width:.0f}" '
           f'height="{height:.0f}" xmlns="http://www.w3.org/2000/svg">']
    for i, layer in enumerate(layers):  # layer 0 at the bottom
        y = top + (L - 1 - i) * cell_h
        out.append(f'<text class="ylab" x="{left - 6}" y="{y + cell_h / 2 + 4}" '
                   f'text-anchor="end">{layer}</text>')
        for j in range(P):
            pos = rec["positions"][j] if by_position else labels[j]
            value = values[i][j]
            token = labels[j] if by_position else f"head {labels[j]}"
            detail = token
            if by_position and clean is not None and corrupt is not None and \
                    clean[pos] != corrupt[pos]:
                detail = f"{display_token(clean[pos])} \u2192 {display_token(corrupt[pos])}"
            shown = "NaN" if value is None else f"{value:.4g}"
            out.append(
                f'<rect class="cell" x="{left + j * cell_w}" y="{y}" width="{cell_w - 1}" '
                f'height="{cell_h - 1}" fill="{_colour(value, lim)}" data-layer="{layer}" '
                f'data-position="{pos}" data-token="{html.escape(token, quote=True)}" '
                f'data-detail="{html.escape(detail, quote=True)}" data-value="{shown}" '
                f'data-row-axis="{html.escape(row_axis)}">'
                f'<title>{html.escape(row_axis)} {layer}, '
                + (f'position {pos} ' if by_position else '')
                + f'{html.escape(detail)}: {shown}</title></rect>')
    base = top + L * cell_h + 6
    for j, label in enumerate(labels):
        x = left + j * cell_w + cell_w / 2 + 4
        out.append(f'<text class="xlab" x="{x}" y="{base}" text-anchor="end" '
                   f'transform="rotate(-90 {x} {base})">{html.escape(label)}</text>')
    out.append(f'<text x="{left - 34}" y="{top + L * cell_h / 2}" class="axis" '
               f'transform="rotate(-90 {left - 34} {top + L * cell_h / 2})" '
               f'text-anchor="middle">{html.escape(row_axis)}</text>')
    # the colourbar: -lim (blue) .. 0 (white) .. +lim (red)
    bx, bh = left + P * cell_w + 14, L * cell_h
    out.append(f'<defs><linearGradient id="cb{panel}" x1="0" y1="1" x2="0" y2="0">'
               f'<stop offset="0" stop-color="{_colour(-lim, lim)}"/>'
               f'<stop offset="0.5" stop-color="{_colour(0.0, lim)}"/>'
               f'<stop offset="1" stop-color="{_colour(lim, lim)}"/></linearGradient></defs>')
    out.append(f'<rect x="{bx}" y="{top}" width="12" height="{bh}" fill="url(#cb{panel})" '
               f'stroke="#999"/>')
    for frac, v in ((0, lim), (0.5, 0.0), (1, -lim)):
        out.append(f'<text class="cbtick" x="{bx + 16}" y="{top + frac * bh + 4}">'
                   f'{v:.3g}</text>')
    text_h = 6.5 * len(rec["value_name"])  # the rotated label's length at 11 px
    lx, ly = bx + 62, top + max(bh, text_h) / 2
    out.append(f'<text class="axis" x="{lx}" y="{ly}" text-anchor="middle" '
               f'transform="rotate(-90 {lx} {ly})">{html.escape(rec["value_name"])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _top_table(rec):
    axes = rec.get("axes", ["layer", "position"])
    names = axes + (["token"] if "position" in axes else [])
    rows = "".join("<tr><td>%d</td>%s<td>%.4g</td></tr>" % (
        i + 1, "".join(f"<td>{html.escape(str(s[a]))}</td>" for a in names), s["value"])
        for i, s in enumerate(rec["top_sites"]))
    head = "".join(f"<th>{html.escape(a)}</th>" for a in names)
    return (f'<table class="top"><thead><tr><th>#</th>{head}'
            f'<th>{html.escape(rec["value_name"])}</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:20px} .panels{display:flex;gap:32px;flex-wrap:wrap}
.heatmap text{font-size:11px;font-family:ui-monospace,monospace} .heatmap .axis{font-family:inherit}
.cell:hover{stroke:#000;stroke-width:2}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:4px 8px;border-radius:4px;
font-size:12px;display:none} table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} .meta{color:#555;font-size:13px}
pre{background:#f4f4f4;padding:8px;font-size:12px;white-space:pre-wrap}
"""

_SCRIPT = """
const tip=document.getElementById('tip');
document.querySelectorAll('.cell').forEach(c=>{
 c.addEventListener('mousemove',e=>{const d=c.dataset;
  tip.textContent=d.rowAxis+' '+d.layer+', '+(d.detail.startsWith('head ')?'':'position '+d.position+' ')+d.detail+': '+d.value;
  tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px';tip.style.display='block';});
 c.addEventListener('mouseleave',()=>{tip.style.display='none';});});
"""


def write_html(records, path, title, prompt=None, agreement=None):
    """The report: a heatmap per record (side by side), the top sites of each, the
    prompt's tokens, rank agreement when two maps are compared, settings and
    provenance. Everything inline."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if prompt:
        parts.append(f"<p class='meta'>{html.escape(prompt)}</p>")
    if agreement is not None:
        parts.append(f"<p id='agreement'>Rank agreement of the two maps: Spearman "
                     f"{agreement['spearman']:.3f}; top-{agreement['top_k']} overlap "
                     f"{agreement['top_k_overlap']:.0%}.</p>")
    parts.append("<div class='panels'>")
    for i, rec in enumerate(records):
        sites = "" if rec.get("sites", "resid") == "resid" else f", {rec['sites']} sites"
        parts.append(f"<div class='panel'><h2>{html.escape(rec['value_name'])} "
                     f"({html.escape(rec['kind'] + sites)})</h2>{_svg_heatmap(rec, i)}"
                     f"<h2>top sites</h2>{_top_table(rec)}</div>")
    parts.append("</div>")
    meta = {k: records[0][k] for k in ("settings", "provenance")}
    parts.append(f"<h2>settings and provenance</h2><pre>"
                 f"{html.escape(json.dumps(meta, indent=1))}</pre>")
    parts.append(f"<div id='tip'></div><script>{_SCRIPT}</script></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
