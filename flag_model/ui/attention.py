"""Widgets of the Attention page: per-head statistics beside what uniform attention would give."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from .. import plots
from ..analysis import attention
from . import download_table
from .session import keep

QUERIES = {"all": "every query (mean over positions)", "deciding": "the deciding bar's query (last position)"}


def show_stats(
    stats: dict[str, pd.DataFrame], future: np.ndarray, last_k: int, length: int, causal: bool, key: str
) -> None:
    """Four layer × head heatmaps for the chosen queries (all, or the deciding bar's), each titled with the
    uniform-attention baseline; the future share per query against its uniform line; both tables to download."""
    which = st.radio(
        "Statistics of", list(QUERIES), format_func=QUERIES.get, horizontal=True, key=keep(f"attn_{key}_queries")
    )
    base = attention.uniform_baseline(length, last_k, causal, None if which == "all" else -1)
    ranges = {"entropy": (0.0, float(np.log(length))), "last_k_share": (0.0, 1.0), "future_share": (0.0, 1.0)}
    labels = {**attention.STATS, "entropy": "entropy (nats)", "last_k_share": f"share on the last {last_k} steps"}
    cols = st.columns(2)
    for i, col in enumerate(attention.STATS):
        title = f"{labels[col]} — uniform: {base[col]:.2f}"
        fig = plots.head_stat_heatmap(stats[which], col, title, ranges.get(col), diverging=col == "lookback")
        cols[i % 2].plotly_chart(fig, key=f"{key}_{col}")
    st.caption(
        "Uniform = attention spread evenly over the keys a query may see: the value of a head with no "
        "preference. Without a mask the mean future share of uniform attention is (S−1)/(2S) ≈ 0.5, so a "
        "future share near 0.5 is no preference, not a strong leak; the deciding bar has no future keys."
    )
    S = future.shape[-1]
    uniform = np.zeros(S) if causal else (S - 1 - np.arange(S)) / S
    st.plotly_chart(plots.future_by_query_lines(future, uniform), key=f"{key}_future")
    table = stats["all"].merge(stats["deciding"], on=["layer", "head"], suffixes=("", "_deciding"))
    with st.expander("Table (every query and the deciding bar's query)"):
        st.dataframe(table, hide_index=True, width="stretch")
        download_table(table, f"attention_heads_{key}", key=f"attn_{key}_stats")
