"""LoRA: adapter metrics per block and module, flags, the spectra of one adapter, and ablation."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import lora
from flag_model.ui import lora as ul
from flag_model.ui.session import keep

st.title("LoRA adapters")
ckpt, model = ui.require_model()
cfg = model.config  # with the sidebar's assumptions


@st.cache_data(max_entries=8, show_spinner="Measuring every adapter…")
def _metrics(digest: str, scale: float, _model):
    return lora.adapter_metrics(_model)


@st.cache_data(max_entries=32, show_spinner="Computing singular values…")
def _spectra(digest: str, scale: float, path: str, _model):
    return lora.spectra(_model, path)


metrics = _metrics(ckpt.digest, cfg.lora_scale, model)
if metrics.empty:
    st.info("This checkpoint has no LoRA adapters (no `lora.lora_A` keys), so there is nothing to show here.")
    st.stop()
st.caption(
    f"{len(metrics)} adapters of rank {cfg.lora_rank}. ΔW = scale·(A @ B)ᵀ with scale = {cfg.lora_scale:g} "
    "— an **assumption** (alpha / r) set in the sidebar; every norm of ΔW scales with it."
)

c1, c2 = st.columns([3, 1])
metric = c1.selectbox("Metric", list(lora.METRICS), format_func=lora.METRICS.__getitem__, key=keep("lora_metric"))
log = c2.toggle(
    "Log colour scale",
    key=keep(f"lora_log_{metric}"),
    value=metric in ("delta_fro", "rel_norm", "spectral", "amplification"),
)
event = st.plotly_chart(
    plots.lora_heatmap(lora.metric_grid(metrics, metric), metrics, lora.METRICS[metric], lora.METRICS, log),
    on_select="rerun",
    selection_mode="points",
    key="lora_heatmap",
)
st.caption(
    "Hover a cell for every metric; click a cell to open its spectra below. ✕ dead adapter (B ≈ 0) · "
    "▲ ΔW dominates W (‖ΔW‖_F > ‖W‖_F) · ! outlier across blocks · ? NaN/Inf in W, A or B. "
    "Grey: no colour on this scale (zero on a log scale, or not a number)."
)

ul.flags(metrics)

with st.expander("All metrics (table and downloads; the flags per adapter are here)"):
    ui.table(metrics, "lora_metrics", key="lora_metrics")

st.subheader("Singular value spectra of one adapter")
paths = list(metrics["path"])
ul.follow_click(event, metrics, "lora_cell")
path = st.selectbox("Adapter", paths, key=keep("lora_cell"))
st.plotly_chart(
    plots.lora_spectra(
        _spectra(ckpt.digest, cfg.lora_scale, path, model),
        lora.adapter_title(metrics, path),
    )
)
st.caption(
    "ΔW has at most r non-zero singular values. Frozen random-init base weights show a smooth "
    "Marchenko–Pastur-shaped spectrum without dominant directions; W + ΔW shows where the adapter bends it."
)

st.subheader("Ablation: switch adapters off")
ul.ablation_panel(ckpt, model, cfg, metrics)
