"""Figure builders: analysis results in, plotly figures out. No model math here."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .analysis.lora import block_label
from .analysis.tensors import block_mean

ACTION_COLORS = {"SELL": "#d62728", "HOLD": "#7f7f7f", "BUY": "#2ca02c"}
MAX_HEATMAP_CELLS = 250_000  # above this plotly pages get slow: downsample first


def plain(text: object) -> str:
    """User text (a tensor key, a CSV column) for a plotly label, title or tick: plotly renders a subset of HTML
    (links included), so <, > and & become entities and show as typed."""
    return html.escape(str(text), quote=False)


# Overview
def parameter_breakdown(counts: pd.DataFrame) -> go.Figure:
    """Horizontal stacked bar of parameters per group (rows base / LoRA / other of `parameter_counts`)."""
    colors = {"base": "#9aa5b1", "LoRA": "#e07b39", "other": "#3b7dd8"}
    fig = go.Figure()
    for group in ("base", "LoRA", "other"):
        n = int(counts.loc[group, "parameters"])
        fig.add_bar(
            y=["parameters"],
            x=[n],
            name=f"{group} ({n:,})",
            orientation="h",
            marker_color=colors[group],
            hovertemplate=f"{group}: %{{x:,}}<extra></extra>",
        )
    fig.update_layout(
        barmode="stack",
        height=140,
        margin=dict(l=10, r=10, t=10, b=10),
        legend=dict(orientation="h", y=-0.4),
        yaxis=dict(showticklabels=False),
    )
    return fig


# Tensor tree and architecture check
STATUS_COLORS = {
    "matched": "#2ca02c",
    "mis-shaped": "#d62728",
    "missing": "#ff7f0e",
    "unexpected": "#9467bd",
    "mixed": "#e8c547",
}


def tensor_treemap(tree: pd.DataFrame, label: str) -> go.Figure:
    """Treemap of the module hierarchy (tensor_tree): area = elements, colour = the chosen statistic.

    Click a box to narrow the view to it; the path bar at the top goes back.
    """
    hover = [
        f"<b>{plain(i.rstrip('/'))}</b><br>{e:,} elements in {n} tensor{'s' * (n > 1)}<br>{label}: {c:.4g}"
        for i, e, n, c in zip(tree["id"], tree["elements"], tree["n_tensors"], tree["color"])
    ]
    fig = go.Figure(
        go.Treemap(
            ids=tree["id"],
            labels=[plain(x) for x in tree["label"]],
            parents=tree["parent"],
            values=tree["elements"],
            branchvalues="total",
            maxdepth=3,  # the root, blocks and their parts (~80 boxes of the 12-block file's 611); a click goes deeper
            hovertext=hover,
            hoverinfo="text",
            marker=dict(colors=tree["color"], colorscale="Viridis", colorbar=dict(title=label, thickness=12)),
            pathbar=dict(visible=True),
            tiling=dict(pad=2),
        )
    )
    fig.update_layout(height=560, margin=dict(l=5, r=5, t=30, b=5))
    return fig


def value_histogram(edges: np.ndarray, counts: np.ndarray, name: str) -> go.Figure:
    """Histogram of a tensor's finite values (pre-binned counts)."""
    centers = (edges[1:] + edges[:-1]) / 2
    fig = go.Figure(
        go.Bar(
            x=centers,
            y=counts,
            width=np.diff(edges),
            marker_color="#3b7dd8",
            hovertemplate="%{x:.4g}: %{y:,}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"values of {plain(name)}",
        height=300,
        bargap=0,
        xaxis_title="value",
        yaxis_title="count",
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def matrix_heatmap(matrix: np.ndarray, name: str, step: int = 1, shape: tuple[int, ...] | None = None) -> go.Figure:
    """A 2-D tensor as a heatmap; `step` > 1 when each cell already is the mean of step×step entries."""
    z, more = block_mean(matrix.astype(np.float64), MAX_HEATMAP_CELLS)
    z = z.astype(np.float32)  # what the browser gets: half the bytes of float64, more than the 4 digits shown
    step *= more
    lim = float(np.nanmax(np.abs(z))) or 1.0
    note = f" (mean of {step}×{step} blocks)" if step > 1 else ""
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x0=0,  # the cell positions as start and step: two numbers, where arrays of 256 cost the browser more
            dx=step,
            y0=0,
            dy=step,
            colorscale="RdBu_r",
            zmid=0,
            zmin=-lim,
            zmax=lim,
            hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title="row")
    fig.update_xaxes(title="column")
    fig.update_layout(
        title=f"{plain(name)} {list(shape or matrix.shape)}{note}", height=420, margin=dict(l=10, r=10, t=40, b=10)
    )
    return fig


def spectrum_vs_init(singular_values: np.ndarray, expected: np.ndarray, edge: float, init: str) -> go.Figure:
    """Singular values (descending) next to the Marchenko–Pastur expectation of a random init of that shape."""
    k = np.arange(1, len(singular_values) + 1)
    fig = go.Figure(
        [
            go.Scatter(
                x=k,
                y=singular_values,
                name="this tensor",
                mode="lines+markers" if len(k) <= 64 else "lines",
                line_color="#d62728",
            ),
            go.Scatter(
                x=k, y=expected, name=f"random init: {init}", mode="lines", line=dict(color="#1f77b4", dash="dash")
            ),
        ]
    )
    if edge > 0:
        fig.add_hline(
            y=edge, line=dict(color="#999", dash="dot"), annotation_text="init edge", annotation_position="top right"
        )
    fig.update_layout(
        title="singular values",
        height=320,
        xaxis_title="index k",
        yaxis_title="singular value",
        legend=dict(orientation="h", y=-0.25),
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def change_heatmap(grid: pd.DataFrame) -> go.Figure:
    """blocks × in-block tensors of the relative change ‖b − a‖ / ‖a‖ between two checkpoints (log10 colour).

    Unchanged tensors are light grey, an infinite change (a all zero, b not) red with "∞" — neither takes a colour
    of the finite scale; blank cells are tensors one of the files does not have. When nothing changed (identical
    files) there is no colour bar, only a note.
    """
    z = grid.to_numpy(dtype=float)
    finite = z[np.isfinite(z) & (z > 0)]
    lo, hi = (np.log10(finite.min()), np.log10(finite.max())) if finite.size else (0.0, 0.0)
    if hi - lo < 1e-9:  # one distinct value: give the scale some width around it
        lo, hi = lo - 0.5, hi + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        logz = np.where(np.isfinite(z) & (z > 0), np.log10(z), np.nan)
    text = np.vectorize(
        lambda v: "" if np.isnan(v) else ("inf" if np.isinf(v) else "0 (unchanged)" if v == 0 else f"{v:.3g}")
    )(z)
    x, y = [str(c) for c in grid.columns], [block_label(b) for b in grid.index]
    hover = "%{y} %{x}<br>‖b−a‖/‖a‖ = %{customdata}<extra></extra>"
    special = np.where(z == 0, 0.0, np.where(np.isposinf(z), 1.0, np.nan))  # unchanged / infinite
    fig = go.Figure(
        go.Heatmap(
            z=special,
            x=x,
            y=y,
            zmin=0,
            zmax=1,
            showscale=False,
            customdata=text,
            colorscale=[[0, "#e4e7eb"], [0.5, "#e4e7eb"], [0.5, "#d62728"], [1, "#d62728"]],
            text=np.where(np.isposinf(z), "∞", ""),
            texttemplate="%{text}",
            hovertemplate=hover,
        )
    )
    if finite.size:
        fig.add_trace(
            go.Heatmap(
                z=logz,
                x=x,
                y=y,
                colorscale="Viridis",
                zmin=lo,
                zmax=hi,
                customdata=text,
                colorbar=dict(title="log10 rel. change"),
                hovertemplate=hover,
            )
        )
    else:
        changed = "no finite change" if np.isposinf(z).any() else "identical: every shared tensor is unchanged"
        fig.add_annotation(text=changed, showarrow=False, xref="paper", yref="paper", x=0.5, y=1.08)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-45)
    fig.update_layout(height=max(260, 28 * len(grid) + 180), margin=dict(l=10, r=10, t=30, b=10))
    return fig


def key_status_treemap(tree: pd.DataFrame) -> go.Figure:
    """The aligned key tree of file vs target (key_status_tree), one colour per status; labels carry counts."""
    hover = [f"<b>{plain(i.rstrip('/'))}</b><br>{s}" for i, s in zip(tree["id"], tree["status"])]
    fig = go.Figure(
        go.Treemap(
            ids=tree["id"],
            labels=[plain(x) for x in tree["label"]],
            parents=tree["parent"],
            values=tree["size"],
            branchvalues="remainder",
            marker=dict(colors=[STATUS_COLORS[s] for s in tree["status"]]),
            hovertext=hover,
            hoverinfo="text",
            maxdepth=3,
            pathbar=dict(visible=True),
            tiling=dict(pad=2),
        )
    )
    fig.update_layout(height=520, margin=dict(l=5, r=5, t=30, b=5))
    return fig


def layout_ranking_bars(ranking: pd.DataFrame) -> go.Figure:
    """How well the file matches each family at the sizes that family reads from the file, best first."""
    r = ranking.iloc[::-1]
    fig = go.Figure(
        go.Bar(
            x=r["score"],
            y=r["title"],
            orientation="h",
            marker_color=["#2ca02c" if s >= 0.9 else "#9aa5b1" for s in r["score"]],
            text=[f"{s:.0%} · {m}/{n} keys" for s, m, n in zip(r["score"], r["matched"], r["layout_keys"])],
            textposition="auto",
            hovertemplate="%{y}: %{x:.0%} of keys match at the sizes read from the file<extra></extra>",
        )
    )
    fig.update_layout(
        height=60 + 32 * len(r),
        xaxis=dict(range=[0, 1], tickformat=".0%", title="keys matched (family at the sizes read from the file)"),
        margin=dict(l=10, r=10, t=10, b=10),
    )
    return fig


# LoRA and attention
def _cell_hover(metrics: pd.DataFrame, grid: pd.DataFrame, labels: dict[str, str]) -> tuple[np.ndarray, str]:
    """customdata (blocks, modules, n) of every metric plus flags, and the matching hovertemplate."""
    idx = pd.MultiIndex.from_product([grid.index, grid.columns])
    by_cell = metrics.set_index(["block", "module"]).reindex(idx)
    cols = list(labels)
    data = np.empty(grid.shape + (len(cols) + 1,), dtype=object)
    for i, col in enumerate(cols):
        data[..., i] = by_cell[col].to_numpy().reshape(grid.shape)
    data[..., -1] = by_cell["flags"].fillna("").to_numpy().reshape(grid.shape)
    lines = [f"{labels[c]}: %{{customdata[{i}]:.4g}}" for i, c in enumerate(cols)]
    template = "%{y}, %{x}<br>" + "<br>".join(lines) + f"<br><b>%{{customdata[{len(cols)}]}}</b><extra></extra>"
    return data, template


def lora_heatmap(
    grid: pd.DataFrame, metrics: pd.DataFrame, label: str, labels: dict[str, str], log: bool = False
) -> go.Figure:
    """blocks × modules heatmap of one metric (`grid`), every metric on hover, flags drawn as symbols.

    An invisible marker sits on each cell so that clicking a cell selects it (plotly heatmaps emit no
    point selection); the symbols are ✕ dead, ▲ ΔW dominates W, ! outlier across blocks, ? NaN/Inf. An adapter
    without a colour (a dead one on a log scale, a NaN) gets a grey cell with a dark symbol, never white on white.
    """
    z = grid.to_numpy(dtype=float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(z > 0, np.log10(z), np.nan)
    x = [str(c) for c in grid.columns]
    y = [block_label(b) for b in grid.index]
    custom, template = _cell_hover(metrics, grid, labels)
    flags = metrics.set_index(["block", "module"]).reindex(pd.MultiIndex.from_product([grid.index, grid.columns]))
    present = flags["path"].notna().to_numpy().reshape(z.shape)
    blank = present & ~np.isfinite(z)
    fig = go.Figure(
        go.Heatmap(
            z=np.where(blank, 0.0, np.nan),
            x=x,
            y=y,
            colorscale=[[0, "#c9ced6"], [1, "#c9ced6"]],
            showscale=False,
            hoverinfo="skip",
        )
    )
    if np.isfinite(z).any():
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=y,
                colorscale="Viridis",
                hoverinfo="skip",
                colorbar=dict(title=("log10 " if log else "") + label),
            )
        )

    def flag(col: str) -> np.ndarray:
        return flags[col].fillna(False).astype(bool).to_numpy() if col in flags else np.zeros(len(flags), bool)

    bad = flag("bad_base") | flag("bad_lora")
    symbols = [
        ("?" if b else "") + ("✕" if d else "") + ("▲" if m else "") + ("!" if o else "")
        for b, d, m, o in zip(bad, flag("dead"), flag("dominating"), flag("outlier"))
    ]
    colours = np.where(blank.ravel(), "#1f2a36", "white")
    gx, gy = np.meshgrid(x, y)
    fig.add_trace(
        go.Scatter(
            x=gx.ravel(),
            y=gy.ravel(),
            mode="markers+text",
            text=symbols,
            textfont=dict(color=list(colours), size=16),
            marker=dict(size=28, symbol="square", color="rgba(0,0,0,0)"),
            customdata=custom.reshape(-1, custom.shape[-1]),
            hovertemplate=template,
            showlegend=False,
        )
    )
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="adapted module", side="top")
    fig.update_layout(height=max(260, 34 * len(y) + 120), margin=dict(l=10, r=10, t=40, b=10), clickmode="event+select")
    return fig


def lora_spectra(spectra: pd.DataFrame, title: str) -> go.Figure:
    """Singular values of ΔW, W and W + ΔW against their index k, log scale."""
    long = spectra.melt(id_vars="k", var_name="matrix", value_name="singular value").dropna()
    fig = px.line(
        long,
        x="k",
        y="singular value",
        color="matrix",
        log_y=True,
        markers=len(spectra) <= 64,
        color_discrete_map={"ΔW": "#d62728", "W": "#1f77b4", "W + ΔW": "#2ca02c"},
        title=plain(title),
    )
    fig.update_yaxes(dtick=1, exponentformat="power")  # decades only: plotly's 2/5 minor labels read as values
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=50, b=10), legend_title_text=None)
    return fig


def ablation_bars(summary: pd.DataFrame) -> go.Figure:
    """Mean decision probability per action with LoRA on (solid) and with the chosen adapters off (hatched)."""
    colors = [ACTION_COLORS.get(a, "#1f77b4") for a in summary["action"]]
    fig = go.Figure(
        [
            go.Bar(x=summary["action"], y=summary["mean p (LoRA on)"], name="LoRA on", marker_color=colors),
            go.Bar(
                x=summary["action"],
                y=summary["mean p (ablated)"],
                name="ablated",
                marker_color=colors,
                marker_pattern_shape="/",
                opacity=0.6,
            ),
        ]
    )
    fig.update_layout(
        barmode="group",
        height=320,
        yaxis_title="mean probability at the decision position",
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def ablation_changes(before: np.ndarray, after: np.ndarray, actions: tuple[str, ...], x: np.ndarray) -> go.Figure:
    """Change of each action's decision probability per sample window (after − before)."""
    fig = go.Figure(
        [
            go.Scatter(x=x, y=after[:, i] - before[:, i], name=a, mode="lines+markers", line_color=ACTION_COLORS.get(a))
            for i, a in enumerate(actions)
        ]
    )
    fig.add_hline(y=0, line_color="#999", line_width=1)
    fig.update_layout(
        height=300,
        yaxis_title="Δ probability (ablated − on)",
        xaxis_title="window end",
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def attention_grid(maps: np.ndarray, max_cells: int = MAX_HEATMAP_CELLS) -> go.Figure:
    """Layers × heads small multiples of attention maps (L, H, S, S), one shared colour scale.

    Drawn as ONE heatmap of tiles (layer i, head h at tile row i, column h) separated by a blank row and column,
    on categorical axes that name layer, head, query and key: 96 subplots of separate heatmaps took about a second
    to build here and several to draw in the browser."""
    L, H, S, _ = maps.shape
    per_map = max(16, max_cells // (L * H))
    tiles = [[block_mean(maps[i, h], per_map) for h in range(H)] for i in range(L)]
    step = tiles[0][0][1]
    n = tiles[0][0][0].shape[0]  # tile side after downsampling
    z = np.full((L * (n + 1) - 1, H * (n + 1) - 1), np.nan, np.float32)
    for i in range(L):
        for h in range(H):
            z[i * (n + 1) : i * (n + 1) + n, h * (n + 1) : h * (n + 1) + n] = tiles[i][h][0]
    span = f"×{step} " if step > 1 else ""
    x = [f"head {h}, key {k * step}" if k < n else f"gap {h}" for h in range(H) for k in range(n + 1)][:-1]
    y = [f"layer {i}, query {q * step}" if q < n else f"gap {i}" for i in range(L) for q in range(n + 1)][:-1]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            coloraxis="coloraxis",
            hoverongaps=False,
            hovertemplate=f"%{{y}} → %{{x}} {span}<br>p %{{z:.3f}}<extra></extra>",
        )
    )
    mid = n // 2
    fig.update_xaxes(
        tickvals=[x[h * (n + 1) + mid] for h in range(H)],
        ticktext=[f"head {h}" for h in range(H)],
        side="top",
        showgrid=False,
    )
    fig.update_yaxes(
        tickvals=[y[i * (n + 1) + mid] for i in range(L)],
        ticktext=[f"L{i}" for i in range(L)],
        autorange="reversed",
        showgrid=False,
    )
    cmax = float(np.quantile(maps, 0.995)) or None
    fig.update_layout(
        coloraxis=dict(colorscale="Viridis", cmin=0, cmax=cmax, colorbar_title="p"),
        height=min(110 * L, 1400) + 60,
        margin=dict(l=10, r=10, t=40, b=10),
        plot_bgcolor="white",
    )
    return fig


def attention_map(a: np.ndarray, title: str, zlabel: str = "attention", cap_diagonal: bool = False) -> go.Figure:
    """One (S, S) map with axes in time steps relative to the decision bar (0 = last bar of the window).

    Cells right of the dashed diagonal are keys later than their query: attention on the future.
    cap_diagonal caps the colour scale at the largest off-diagonal value (rollout: the residual
    makes the diagonal dominate and would flatten everything else).
    """
    S = a.shape[0]
    zmax = float(a[~np.eye(S, dtype=bool)].max()) if cap_diagonal and S > 1 else None
    z, step = block_mean(a, MAX_HEATMAP_CELLS)
    steps = np.arange(0, S, step) - (S - 1)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=steps,
            y=steps,
            colorscale="Viridis",
            zmin=0,
            zmax=zmax,
            colorbar_title=zlabel,
            hovertemplate="query t%{y:+d}, key t%{x:+d}<br>%{z:.4f}<extra></extra>",
        )
    )
    fig.add_shape(type="line", x0=-(S - 1), y0=-(S - 1), x1=0, y1=0, line=dict(color="white", dash="dash"))
    fig.update_yaxes(autorange="reversed", title="query (steps from the decision bar)")
    fig.update_xaxes(title="key (steps from the decision bar)")
    fig.update_layout(title=title, height=480, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def decision_inflow(row: np.ndarray) -> go.Figure:
    """The decision bar's rollout row: how much each input step flows into the decision."""
    S = len(row)
    fig = go.Figure(go.Bar(x=np.arange(S) - (S - 1), y=row, marker_color="#1f77b4"))
    fig.update_layout(
        height=260,
        xaxis_title="input step (0 = decision bar)",
        yaxis_title="rollout share",
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def head_stat_heatmap(
    stats: pd.DataFrame, column: str, label: str, zrange: tuple[float, float] | None = None, diverging: bool = False
) -> go.Figure:
    """layers × heads heatmap of one per-head statistic, values written in the cells.

    zrange fixes the colour scale (e.g. 0..1 for shares, so small differences do not look large);
    diverging centres a red-blue scale at 0 (signed statistics such as look-back distance).
    """
    grid = stats.pivot(index="layer", columns="head", values=column)
    z = grid.to_numpy()
    colour: dict[str, Any] = dict(colorscale="RdBu", zmid=0) if diverging else dict(colorscale="Viridis")
    if zrange is not None:
        colour.update(zmin=zrange[0], zmax=zrange[1])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"h{h}" for h in grid.columns],
            y=[f"L{i}" for i in grid.index],
            text=np.round(z, 2),
            texttemplate="%{text}" if grid.size <= 150 else None,
            hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>",
            colorbar=dict(thickness=10),
            **colour,
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=label, height=max(220, 26 * len(grid) + 90), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def future_by_query_lines(future: np.ndarray, uniform: np.ndarray | None = None) -> go.Figure:
    """Share of attention on later positions per query step, one line per layer (mean over heads), and the
    share uniform attention would give (dotted)."""
    L, S = future.shape
    x = np.arange(S) - (S - 1)
    fig = go.Figure([go.Scatter(x=x, y=future[i], name=f"layer {i}", mode="lines") for i in range(L)])
    if uniform is not None:
        fig.add_trace(
            go.Scatter(
                x=x, y=uniform, name="uniform attention", mode="lines", line=dict(color="#7f7f7f", dash="dot", width=2)
            )
        )
    fig.update_layout(
        height=300,
        xaxis_title="query step (0 = decision bar)",
        yaxis_title="share on future keys",
        yaxis_range=[0, 1],
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


# Attributions
POS_COLOR, NEG_COLOR = "#b2182b", "#2166ac"  # the ends of the RdBu_r heatmap scale: for / against the class


def attribution_heatmap(
    attr: np.ndarray, feature_names: tuple[str, ...], offsets: np.ndarray, title: str, zlabel: str = "attribution"
) -> go.Figure:
    """attr (S, D) as features (rows) × time steps (columns), diverging colours centred at 0."""
    z = np.asarray(attr, dtype=np.float64).T  # (D, S)
    names, x = [plain(n) for n in feature_names], np.asarray(offsets)
    if z.size > MAX_HEATMAP_CELLS:
        z, step = block_mean(z, MAX_HEATMAP_CELLS)
        names, x = names[::step], x[::step]
    lim = float(np.nanmax(np.abs(z))) if z.size else 0.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=names,
            colorscale="RdBu_r",
            zmid=0,
            zmin=-(lim or 1),
            zmax=lim or 1,
            colorbar=dict(title=zlabel, thickness=12),
            hovertemplate="%{y} at t%{x:+d}<br>" + zlabel + " %{z:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10), dtick=1 if len(names) <= 80 else None)
    fig.update_xaxes(title="time step (0 = deciding bar)")
    fig.update_layout(title=title, height=max(380, 13 * len(names) + 120), margin=dict(l=10, r=10, t=50, b=10))
    return fig


def signed_bars(
    labels: list[str], values: np.ndarray, title: str, value_title: str, horizontal: bool = True
) -> go.Figure:
    """Bars coloured by sign (red: for the explained class, blue: against); horizontal lists first on top."""
    values = np.asarray(values, dtype=np.float64)
    labels = [plain(x) if isinstance(x, str) else x for x in labels]
    colors = np.where(values >= 0, POS_COLOR, NEG_COLOR)
    if horizontal:
        bar = go.Bar(
            x=values, y=labels, orientation="h", marker_color=colors, hovertemplate="%{y}: %{x:.4g}<extra></extra>"
        )
        fig = go.Figure(bar)
        fig.update_yaxes(autorange="reversed")
        fig.update_xaxes(title=value_title)
        height = max(260, 20 * len(labels) + 90)
    else:
        fig = go.Figure(
            go.Bar(x=labels, y=values, marker_color=colors, hovertemplate="t%{x:+d}: %{y:.4g}<extra></extra>")
        )
        fig.update_yaxes(title=value_title)
        fig.update_xaxes(title="time step (0 = deciding bar)")
        height = 280
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def class_probabilities(probs: np.ndarray, names: tuple[str, ...], explained: str) -> go.Figure:
    """The model's probabilities at the deciding bar; the explained class is outlined."""
    fig = go.Figure(
        go.Bar(
            x=list(names),
            y=probs,
            marker_color=[ACTION_COLORS.get(n, "#1f77b4") for n in names],
            marker_line=dict(width=[3 if n == explained else 0 for n in names], color="black"),
            text=[f"{p:.1%}" for p in probs],
            textposition="outside",
            hovertemplate="%{x}: %{y:.2%}<extra></extra>",
        )
    )
    fig.update_layout(
        height=260,
        yaxis=dict(range=[0, 1.1], title="probability"),
        title="Model output",
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def agreement_heatmap(corr: pd.DataFrame, title: str) -> go.Figure:
    """Spearman rank correlation matrix between methods, values written in the cells."""
    z = corr.to_numpy(dtype=np.float64)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(corr.columns),
            y=list(corr.index),
            colorscale="RdBu_r",
            zmin=-1,
            zmax=1,
            text=np.where(np.isnan(z), "n/a", np.vectorize(lambda v: f"{v:.2f}")(np.nan_to_num(z))),
            texttemplate="%{text}",
            colorbar=dict(title="ρ", thickness=12),
            hovertemplate="%{y} vs %{x}: ρ = %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=max(280, 45 * len(corr) + 120), margin=dict(l=10, r=10, t=50, b=10))
    return fig


def global_importance_bars(table: pd.DataFrame, top_k: int) -> go.Figure:
    """Ranked mean |per-feature total| over many windows (GlobalImportance.table()), top_k features."""
    top = table.head(top_k)
    fig = go.Figure(
        go.Bar(
            x=top["mean_abs"],
            y=top["feature"],
            orientation="h",
            customdata=top["mean_signed"],
            marker_color=np.where(top["mean_signed"] >= 0, POS_COLOR, NEG_COLOR),
            hovertemplate="%{y}<br>mean |total| %{x:.4g}<br>mean signed %{customdata:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=f"Top {len(top)} features over many windows",
        xaxis_title="mean |attribution summed over time|",
        height=max(300, 20 * len(top) + 100),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def class_breakdown_bars(table: pd.DataFrame, names: tuple[str, ...], top_k: int) -> go.Figure:
    """Mean |per-feature total| by predicted class for the top_k features overall, one bar group per feature."""
    top = table.head(top_k)
    fig = go.Figure(
        [
            go.Bar(x=top[f"mean_abs_{n}"], y=top["feature"], orientation="h", name=n, marker_color=ACTION_COLORS.get(n))
            for n in names
        ]
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title="By predicted class",
        barmode="group",
        xaxis_title="mean |attribution summed over time|",
        height=max(320, 12 * len(names) * len(top) + 120),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


# Predictions
MAX_LINE_POINTS = 5_000  # long time series are thinned (or bin-averaged) to this many points
MAX_MARKERS = 1_000  # BUY / SELL markers drawn per class (each is an SVG element)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 22nd, 101st…"""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _bins(n: int, max_points: int = MAX_LINE_POINTS) -> int:
    """Bars per plotted point so that at most max_points are drawn."""
    return max(1, -(-n // max_points))


def _bin_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over consecutive groups of k rows: (n, ...) -> (ceil(n/k), ...)."""
    if k == 1:
        return a
    n = len(a)
    pad = (-n) % k
    padded = np.concatenate([a, np.full((pad, *a.shape[1:]), np.nan)]) if pad else a
    with np.errstate(invalid="ignore"):
        return np.nanmean(padded.reshape(-1, k, *a.shape[1:]), axis=1)


def price_signals(
    times: pd.DatetimeIndex,
    close: np.ndarray,
    actions: np.ndarray,
    names: tuple[str, ...],
    max_markers: int = MAX_MARKERS,
) -> go.Figure:
    """Close price with BUY (▲) and SELL (▼) markers; markers are thinned evenly when there are many."""
    k = _bins(len(close))
    # SVG, not WebGL: a line of ≤ MAX_LINE_POINTS is one path, and a WebGL context costs a second or more to set up
    # where the browser renders it in software (no GPU, headless); markers are thinned to max_markers per class.
    fig = go.Figure(
        go.Scatter(x=times[::k], y=close[::k], mode="lines", name="close", line=dict(color="#4c5c6c", width=1))
    )
    for name, symbol in (("BUY", "triangle-up"), ("SELL", "triangle-down")):
        if name not in names:
            continue
        idx = np.flatnonzero(actions == names.index(name))
        step = max(1, -(-len(idx) // max_markers))
        idx = idx[::step]
        label = f"{name} ({'every ' + ordinal(step) + ', ' if step > 1 else ''}{len(idx):,} shown)"
        fig.add_trace(
            go.Scatter(
                x=times[idx],
                y=close[idx],
                mode="markers",
                name=label,
                marker=dict(symbol=symbol, size=7, color=ACTION_COLORS[name]),
            )
        )
    fig.update_layout(
        height=360, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="close", legend=dict(orientation="h", y=1.08)
    )
    return fig


def probability_timeline(times: pd.DatetimeIndex, probs: np.ndarray, names: tuple[str, ...]) -> go.Figure:
    """Stacked action probabilities over time (mean over bins of bars when the series is long)."""
    k = _bins(len(probs))
    p = _bin_mean(probs, k)
    t = times[::k][: len(p)]
    fig = go.Figure(
        [
            go.Scatter(
                x=t, y=p[:, i], name=n, stackgroup="p", mode="lines", line_width=0.5, line_color=ACTION_COLORS.get(n)
            )
            for i, n in enumerate(names)
        ]
    )
    title = "probability" + (f" (mean over {k} bars)" if k > 1 else "")
    fig.update_layout(
        height=260,
        yaxis=dict(title=title, range=[0, 1]),
        margin=dict(l=10, r=10, t=30, b=10),
        legend=dict(orientation="h", y=1.12),
    )
    return fig


def class_share_bars(shares: pd.DataFrame, alarm: float) -> go.Figure:
    """Share of each predicted action, with the collapse-alarm threshold."""
    fig = go.Figure(
        go.Bar(
            x=shares["action"],
            y=shares["share"],
            text=[f"{s:.1%}" for s in shares["share"]],
            marker_color=[ACTION_COLORS.get(a, "#1f77b4") for a in shares["action"]],
        )
    )
    fig.add_hline(y=alarm, line_dash="dot", line_color="#d62728", annotation_text=f"collapse alarm {alarm:.0%}")
    fig.update_layout(
        height=260,
        yaxis=dict(title="share of predictions", range=[0, 1], tickformat=".0%"),
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def confidence_histogram(probs: np.ndarray, actions: np.ndarray, names: tuple[str, ...]) -> go.Figure:
    """Histogram of the winning probability, one colour per predicted action."""
    conf = probs.max(axis=1)
    fig = go.Figure(
        [
            go.Histogram(
                x=conf[actions == i],
                name=n,
                marker_color=ACTION_COLORS.get(n),
                opacity=0.75,
                xbins=dict(start=1 / len(names), end=1.0, size=0.02),
            )
            for i, n in enumerate(names)
        ]
    )
    fig.update_layout(
        barmode="stack",
        height=260,
        xaxis_title="confidence (winning probability)",
        yaxis_title="bars",
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def logit_distributions(logits: np.ndarray, names: tuple[str, ...]) -> go.Figure:
    """Box plot of each class's raw logit over all predictions (offsets not applied)."""
    fig = go.Figure(
        [
            go.Box(y=logits[:, i], name=n, marker_color=ACTION_COLORS.get(n), boxpoints=False)
            for i, n in enumerate(names)
        ]
    )
    fig.update_layout(height=260, yaxis_title="logit", showlegend=False, margin=dict(l=10, r=10, t=30, b=10))
    return fig


def confusion_heatmap(confusion: pd.DataFrame) -> go.Figure:
    """Counts of true (rows) vs predicted (columns) actions; colour is the share of each true row."""
    counts = confusion.to_numpy()
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    text = [[f"{c:,}<br>{s:.0%}" for c, s in zip(rc, rs)] for rc, rs in zip(counts, share)]
    fig = go.Figure(
        go.Heatmap(
            z=share,
            x=list(confusion.columns),
            y=list(confusion.index),
            text=text,
            texttemplate="%{text}",
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar=dict(title="row share"),
        )
    )
    fig.update_layout(
        height=300,
        xaxis_title="predicted",
        yaxis=dict(title="true", autorange="reversed"),
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def accuracy_by_position(by_position: pd.DataFrame, baseline: float) -> go.Figure:
    """Accuracy at each position of the window (blocks mode) against the majority baseline, with its interval
    band when `by_position` has lo/hi columns."""
    fig = go.Figure()
    if {"lo", "hi"} <= set(by_position.columns):
        x = list(by_position["position"])
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=list(by_position["hi"]) + list(by_position["lo"])[::-1],
                fill="toself",
                fillcolor="rgba(59,125,216,0.18)",
                line=dict(width=0),
                name="95 % interval",
                hoverinfo="skip",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=by_position["position"],
            y=by_position["accuracy"],
            mode="lines+markers",
            name="accuracy",
            customdata=by_position["n"],
            line_color="#3b7dd8",
            hovertemplate="position %{x}: %{y:.1%} over %{customdata:,} bars<extra></extra>",
        )
    )
    fig.add_hline(y=baseline, line_dash="dot", line_color="#7f7f7f", annotation_text="majority baseline")
    fig.update_layout(
        height=280,
        xaxis_title="position in the window (last = decision in rolling mode)",
        yaxis=dict(title="accuracy", tickformat=".0%"),
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def equity_lines(frame: pd.DataFrame) -> go.Figure:
    """Growth of 1 for the signal strategy and for buy-and-hold (thinned for long series)."""
    k = _bins(len(frame))
    f = frame.iloc[::k]
    fig = go.Figure(
        [
            go.Scatter(x=f["datetime"], y=f["strategy"], name="signals (long/flat/short)", line_color="#3b7dd8"),
            go.Scatter(x=f["datetime"], y=f["buy_and_hold"], name="buy and hold", line_color="#9aa5b1"),
        ]
    )
    fig.update_layout(
        height=300, yaxis_title="growth of 1", margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.1)
    )
    return fig


# What-if
def before_after_bars(
    before: np.ndarray, after: np.ndarray, names: tuple[str, ...], title: str, after_label: str = "after the edit"
) -> go.Figure:
    """Decision probabilities (n_actions,) before and after side by side; the deciding class in bold text."""
    fig = go.Figure()
    for label, probs, opacity in (("before", before, 0.45), (after_label, after, 1.0)):
        top = int(np.argmax(probs))
        fig.add_bar(
            x=list(names),
            y=probs,
            name=label,
            opacity=opacity,
            marker_color=[ACTION_COLORS.get(n, "#1f77b4") for n in names],
            text=[f"<b>{p:.1%}</b>" if i == top else f"{p:.1%}" for i, p in enumerate(probs)],
            textposition="outside",
            hovertemplate=f"{label}<br>%{{x}}: %{{y:.2%}}<extra></extra>",
        )
    fig.update_layout(
        barmode="group",
        height=280,
        title=title,
        yaxis=dict(range=[0, 1.15], title="probability"),
        legend=dict(orientation="h", y=-0.15),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def stability_lines(curves: dict[str, pd.DataFrame]) -> go.Figure:
    """Share of decisions unchanged against the noise size k (in σ per feature), one line per curve
    (frames from Stability.curve())."""
    fig = go.Figure()
    for name, df in curves.items():
        fig.add_scatter(
            x=df["k"],
            y=df["share unchanged"],
            mode="lines+markers",
            name=name,
            hovertemplate="k = %{x:g} σ: %{y:.1%} unchanged<extra>" + name + "</extra>",
        )
    fig.update_xaxes(type="log", title="noise k · σ per feature")
    fig.update_layout(
        height=300,
        title="Decision stability under Gaussian noise",
        yaxis=dict(range=[0, 1.05], title="share of decisions unchanged", tickformat=".0%"),
        legend=dict(orientation="h", y=-0.25),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def deletion_insertion_lines(frame: pd.DataFrame, title: str) -> go.Figure:
    """Deletion and insertion curves (Curves.frame()) of a method and of random orders, two panels."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("Deletion (lower area is better)", "Insertion (higher area is better)")
    )
    for col, curve in ((1, "deletion"), (2, "insertion")):
        part = frame[frame["curve"] == curve]
        for order, df in part.groupby("order", sort=False):
            rand = order == "random (mean)"
            fig.add_scatter(
                x=df["fraction"],
                y=df["probability"],
                mode="lines",
                name=order,
                row=1,
                col=col,
                line=dict(color="#9aa5b1" if rand else "#3b7dd8", dash="dash" if rand else "solid"),
                showlegend=col == 1,
                hovertemplate="%{x:.0%} of cells: p = %{y:.3f}<extra></extra>",
            )
    fig.update_xaxes(title="share of cells moved", tickformat=".0%")
    fig.update_yaxes(title="probability of the class", range=[0, 1.02])
    fig.update_layout(
        height=320, title=title, legend=dict(orientation="h", y=-0.3), margin=dict(l=10, r=10, t=70, b=10)
    )
    return fig


def randomisation_lines(frame: pd.DataFrame) -> go.Figure:
    """Spearman ρ with the original attributions against the blocks whose adapters were re-initialised."""
    fig = go.Figure()
    for method, df in frame.groupby("method", sort=False):
        fig.add_scatter(
            x=df["randomised"],
            y=df["spearman"],
            mode="lines+markers",
            name=method,
            customdata=df["decision"],
            hovertemplate="%{x}: ρ = %{y:.3f}<br>decision %{customdata}<extra>" + method + "</extra>",
        )
    fig.update_layout(
        height=320,
        title="Randomisation check: LoRA adapters re-initialised from the top block down",
        xaxis_title="adapters re-initialised",
        yaxis=dict(range=[-0.2, 1.05], title="Spearman ρ of |cells|"),
        legend=dict(orientation="h", y=-0.3),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


# Hypotheses
def hypothesis_intervals(table: pd.DataFrame, top: int = 20) -> go.Figure:
    """Mean NLL of the best `top` ranking entries with their bootstrap intervals, best at the top; entries
    dropped by screening in grey (scored on fewer windows)."""
    t = table.head(top).iloc[::-1]
    fig = go.Figure()
    for stage, color in (("final", "#3b7dd8"), ("screened out", "#9aa5b1")):
        s = t[t["stage"] == stage]
        if s.empty:
            continue
        fig.add_scatter(
            x=s["nll"],
            y=[f"#{r} {lab}" for r, lab in zip(s["rank"], s["label"])],
            mode="markers",
            name=stage,
            marker=dict(color=color, size=9),
            error_x=dict(
                type="data",
                symmetric=False,
                array=s["nll_high"] - s["nll"],
                arrayminus=s["nll"] - s["nll_low"],
                color=color,
            ),
            customdata=np.stack([s["share_best"], s["windows"]], axis=1),
            hovertemplate="%{y}<br>NLL %{x:.4f}<br>best in %{customdata[0]:.1%} of resamples"
            "<br>%{customdata[1]} windows<extra></extra>",
        )
    fig.update_layout(
        height=120 + 24 * len(t),
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_title="mean NLL (lower is better)",
        legend=dict(orientation="h", y=1.02, x=0),
        yaxis=dict(type="category"),
    )
    return fig
