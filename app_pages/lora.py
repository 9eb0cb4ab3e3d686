"""LoRA: adapter metrics per block and module, flags, the spectra of one adapter, and ablation."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import lora
from flag_model.analysis.attention import spread_starts
from flag_model.config import SHORT_NAMES
from flag_model.data import rolling_windows
from flag_model.ui.session import bounded, keep, subset

st.title("LoRA adapters")
ckpt, model = ui.require_model()
cfg = ui.loaded().config
assumptions = (cfg.num_heads, cfg.lora_scale, cfg.norm_first, cfg.causal)


@st.cache_data(max_entries=8, show_spinner="Measuring every adapter…")
def _metrics(digest: str, scale: float, _model):
    return lora.adapter_metrics(_model)


@st.cache_data(max_entries=32, show_spinner="Computing singular values…")
def _spectra(digest: str, scale: float, path: str, _model):
    return lora.spectra(_model, path)


@st.cache_data(max_entries=16, show_spinner="Running the model with and without the chosen adapters…")
def _ablation(
    digest: str, assumptions: tuple, data_key: str, disabled: tuple, starts: tuple, length: int, _model, _values
):
    return lora.ablate(_model, rolling_windows(_values, length)[list(starts)], disabled)


metrics = _metrics(ckpt.digest, cfg.lora_scale, model)
if metrics.empty:
    st.info("This checkpoint has no LoRA adapters (no `lora.lora_A` keys), so there is nothing to show here.")
    st.stop()
st.caption(
    f"{len(metrics)} adapters of rank {cfg.lora_rank}. ΔW = scale·(A @ B)ᵀ with scale = {cfg.lora_scale:g} "
    "— an **assumption** (alpha / r) set in the sidebar; every norm of ΔW scales with it."
)

c1, c2 = st.columns([3, 1])
metric = c1.selectbox("Metric", list(lora.METRICS), format_func=lora.METRICS.get, key=keep("lora_metric"))
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
    st.warning("\n".join(f"- {ui.md_escape(line)}" for line in lines))

with st.expander("All metrics (table and downloads; the flags per adapter are here)"):
    ui.table(metrics, "lora_metrics", key="lora_metrics")

st.subheader("Singular value spectra of one adapter")
paths = list(metrics["path"])
points = [p for p in (event.selection.points if event else []) if "x" in p and "y" in p]
if points:
    click = (str(points[0]["y"]), str(points[0]["x"]))
    if st.session_state.get("_lora_click") != click:  # a new click moves the chooser; later choices stay free
        st.session_state["_lora_click"] = click
        hit = metrics[(metrics["block"] == int(click[0].split()[-1])) & (metrics["module"] == click[1])]
        if len(hit):
            st.session_state["lora_cell"] = hit["path"].iloc[0]
path = st.selectbox("Adapter", paths, key=keep("lora_cell"))
row = metrics.set_index("path").loc[path]
st.plotly_chart(
    plots.lora_spectra(
        _spectra(ckpt.digest, cfg.lora_scale, path, model),
        f"{path}  ({row['d_out']}×{row['d_in']}, rank {row['rank']})",
    )
)
st.caption(
    "ΔW has at most r non-zero singular values. Frozen random-init base weights show a smooth "
    "Marchenko–Pastur-shaped spectrum without dominant directions; W + ΔW shows where the adapter bends it."
)

st.subheader("Ablation: switch adapters off")
name, fm, data_key = ui.market_features(ckpt, cfg.state_dim)
for w in fm.warnings:
    st.warning(ui.md_escape(w))
blocks = sorted(metrics["block"].unique())
modules = [m for m in SHORT_NAMES if SHORT_NAMES[m] in set(metrics["module"])]
with st.form("lora_ablation"):
    a1, a2 = st.columns(2)
    chosen_blocks = a1.multiselect("Blocks", blocks, key=subset("lora_blocks", blocks, blocks))
    chosen_modules = a2.multiselect(
        "Modules", modules, format_func=SHORT_NAMES.get, key=subset("lora_modules", modules, modules)
    )
    a3, a4 = st.columns(2)
    top = min(cfg.max_length, len(fm.values))
    dflt = min(ui.default_window(ckpt, cfg.max_length), top)
    length = ui.int_slider(a3, "Window length", 1, top, dflt, key=bounded("lora_length", 1, top, dflt))
    count = a4.slider("Sample windows (spread over the data)", 4, 256, key=bounded("lora_count", 4, 256, 32))
    run = st.form_submit_button("Run ablation", type="primary")
st.caption(
    f"LoRA is switched off on a copy for the adapters in the chosen blocks **and** modules; the shared "
    f"model is not touched. Windows come from {ui.md_escape(name)}; the decision is the last position."
)
if run:
    st.session_state["_lora_ablation_on"] = True
if st.session_state.get("_lora_ablation_on"):
    disabled = tuple(lora.adapter_paths(model, chosen_blocks, chosen_modules))
    if not disabled:
        st.info("No adapter is in the chosen blocks and modules; choose at least one of each.")
        st.stop()
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
    ui.table(summary, "lora_ablation", key="lora_ablation")
