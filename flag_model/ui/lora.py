"""Streamlit pieces of the LoRA page: the flags, the clicked cell and the ablation panel (the measurements live in
flag_model.analysis.lora)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from .. import plots
from ..analysis import lora
from ..checkpoint import Checkpoint
from ..config import SHORT_NAMES, ModelConfig
from ..data import rolling_windows, spread_starts
from .session import bounded, subset, window_length


def flags(metrics: pd.DataFrame) -> None:
    """Counts of dead, dominating and outlier adapters, and the warnings they raise."""
    from . import md_escape

    f1, f2, f3 = st.columns(3)
    f1.metric("Dead adapters", int(metrics["dead"].sum()))
    f2.metric("ΔW dominates W", int(metrics["dominating"].sum()))
    f3.metric("Outliers across blocks", int(metrics["outlier"].sum()))
    if metrics["dead"].all():
        st.error(
            f"All {len(metrics)} adapters are dead (B ≈ 0): LoRA changes nothing in this file — it was saved "
            "before training, or the adapters were never trained. The model is its base weights alone."
        )
    lines = lora.flag_summary(metrics)
    if lines:
        st.warning("\n".join(f"- {md_escape(line)}" for line in lines))


def follow_click(event, metrics: pd.DataFrame, key: str) -> None:
    """A new click on a heatmap cell sets the adapter chooser `key`; later choices in the chooser stay free."""
    points = [p for p in (event.selection.points if event else []) if "x" in p and "y" in p]
    if not points:
        return
    click = (str(points[0]["y"]), str(points[0]["x"]))
    if st.session_state.get("_lora_click") != click:
        st.session_state["_lora_click"] = click
        path = lora.adapter_at(metrics, *click)
        if path is not None:
            st.session_state[key] = path


@st.cache_data(max_entries=16, show_spinner="Running the model with and without the chosen adapters…")
def _ablation(
    digest: str, assumptions: tuple, data_key: str, disabled: tuple, starts: tuple, length: int, _model, _values
):
    return lora.ablate(_model, rolling_windows(_values, length)[list(starts)], disabled)


def ablation_panel(ckpt: Checkpoint, model, cfg: ModelConfig, metrics: pd.DataFrame) -> None:
    """Blocks × modules to switch off, sample windows, and the change in SELL/HOLD/BUY (on a copy of the model)."""
    from . import market_features, md_escape, table

    assumptions = cfg.assumption_key
    name, fm, data_key = market_features(ckpt, cfg.state_dim)
    blocks = sorted(metrics["block"].unique())
    modules = [m for m in SHORT_NAMES if SHORT_NAMES[m] in set(metrics["module"])]
    with st.form("lora_ablation"):
        a1, a2 = st.columns(2)
        chosen_blocks = a1.multiselect("Blocks", blocks, key=subset("lora_blocks", blocks, blocks))
        chosen_modules = a2.multiselect(
            "Modules", modules, format_func=lambda m: SHORT_NAMES[m], key=subset("lora_modules", modules, modules)
        )
        a3, a4 = st.columns(2)
        length = window_length(a3, ckpt.meta, cfg.max_length, len(fm.values), "lora_length")
        count = a4.slider("Sample windows (spread over the data)", 4, 256, key=bounded("lora_count", 4, 256, 32))
        run = st.form_submit_button("Run ablation", type="primary")
    st.caption(
        f"LoRA is switched off on a copy for the adapters in the chosen blocks **and** modules; the shared "
        f"model is not touched. Windows come from {md_escape(name)}; the decision is the last position."
    )
    if run:
        st.session_state["_lora_ablation_on"] = True
    if not st.session_state.get("_lora_ablation_on"):
        return
    disabled = tuple(lora.adapter_paths(model, chosen_blocks, chosen_modules))
    if not disabled:
        st.info("No adapter is in the chosen blocks and modules; choose at least one of each.")
        return
    starts = tuple(int(s) for s in spread_starts(len(fm.values), length, count))
    result = _ablation(ckpt.digest, assumptions, data_key, disabled, starts, length, model, fm.values)
    summary = result.summary()
    m1, m2 = st.columns(2)
    m1.metric("Adapters off", f"{len(disabled)} / {len(metrics)}")
    m2.metric("Decisions that change", f"{result.flipped:.0%}", help=f"over {len(starts)} windows")
    st.plotly_chart(plots.ablation_bars(summary))
    st.plotly_chart(
        plots.ablation_changes(result.before, result.after, result.actions, fm.times[[s + length - 1 for s in starts]])
    )
    table(summary, "lora_ablation", key="lora_ablation")
