"""Attention: maps of one sample window, rollout, per-head statistics, and statistics over many windows."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import attention
from flag_model.data import rolling_windows, spread_starts
from flag_model.features import action_names
from flag_model.ui.attention import show_stats
from flag_model.ui.session import bounded, choice, keep, window_by_time

st.title("Attention")
ckpt, model = ui.require_model()
cfg = model.config  # with the sidebar's assumptions
assumptions = cfg.assumption_key


@st.cache_data(max_entries=16, show_spinner="Computing attention maps…")
def _window(digest: str, assumptions: tuple, data_key: str, start: int, length: int, _model, _values):
    return attention.window_attention(_model, _values[start : start + length])


@st.cache_data(max_entries=8, show_spinner=False)
def _summary(digest: str, assumptions: tuple, data_key: str, starts: tuple, length: int, last_k: int, _model, _values):
    bar = st.progress(0.0, text="Attention over many windows…")  # made here so that cache replay hides it
    result = attention.attention_summary(
        _model, rolling_windows(_values, length)[list(starts)], last_k, progress=lambda f, m: bar.progress(f, text=m)
    )
    bar.empty()
    return result


mask = "causal mask (no future)" if cfg.causal else "no mask — every position sees the future"
st.info(
    f"**Assumptions** (not recoverable from the weights; change them in the sidebar): "
    f"**{cfg.num_heads} heads** of size {cfg.head_dim} · **{mask}** · "
    f"**{'pre' if cfg.norm_first else 'post'}-norm** · LoRA scale **{cfg.lora_scale:g}**."
)
name, fm, data_key = ui.market_features(ckpt, cfg.state_dim)
n = len(fm.values)
c1, c2 = st.columns([1, 3])
length = ui.window_length(c1, ckpt.meta, cfg.max_length, n, "attn_length")
start = window_by_time(fm.times, length, "attn_when", container=c2)
wa = _window(ckpt.digest, assumptions, data_key, start, length, model, fm.values)
L, H = wa.maps.shape[:2]
probs = " · ".join(f"{a} {p:.0%}" for a, p in zip(action_names(len(wa.probs[-1])), wa.probs[-1]))
st.caption(
    f"{ui.md_escape(name)}: bars {fm.times[start]} → {fm.times[start + length - 1]} ({length} steps). "
    f"Decision at the last bar: {probs}."
)

# Lazy tabs: only the open tab is computed and drawn (all five were nine charts on every visit).
grid_tab, zoom_tab, roll_tab, stat_tab, many_tab = st.tabs(
    ["Layers × heads", "Zoom", "Rollout", "Head statistics", "Over many windows"],
    key=keep("attn_tab"),
    on_change="rerun",
)
with grid_tab:
    if grid_tab.open:
        st.plotly_chart(plots.attention_grid(wa.maps))
        st.caption("Rows are queries, columns keys; the colour scale is shared and capped at the 99.5th percentile.")
with zoom_tab:
    if zoom_tab.open:
        z1, z2 = st.columns(2)
        layer = z1.selectbox("Layer", range(L), key=choice("attn_layer", range(L), L - 1))
        head = z2.selectbox(
            "Head", ["mean of heads", *range(H)], key=choice("attn_head", ["mean of heads", *range(H)], "mean of heads")
        )
        a = attention.head_map(wa.maps, layer, None if head == "mean of heads" else head)
        st.plotly_chart(plots.attention_map(a, f"layer {layer}, {head if isinstance(head, str) else f'head {head}'}"))
        st.caption(
            "Cells right of the dashed diagonal are attention on later bars — information the model would "
            "not have when trading live."
        )
with roll_tab:
    if roll_tab.open:
        roll = attention.rollout(wa.maps)
        st.plotly_chart(plots.attention_map(roll, "Attention rollout through all layers", "rollout", cap_diagonal=True))
        st.plotly_chart(plots.decision_inflow(roll[-1]))
        st.caption(
            "Rollout (Abnar & Zuidema 2020): per layer the mean over heads, 0.5·A + 0.5·I for the residual, "
            "rows renormalised, multiplied through the layers. The bars: what flows into the decision bar."
        )
with stat_tab:
    if stat_tab.open:
        last_k = st.number_input(
            "k for the share on the last k steps", 1, length, key=bounded("attn_last_k", 1, length, min(8, length))
        )
        stats = {q: attention.head_stats(wa.maps, last_k, None if q == "all" else -1) for q in ("all", "deciding")}
        show_stats(stats, attention.future_by_layer(wa.maps), last_k, length, cfg.causal, "one")
with many_tab:
    if many_tab.open:
        count = st.slider(
            "Windows (spread evenly over the data)", 8, 1024, step=8, key=bounded("attn_count", 8, 1024, 64)
        )
        starts = tuple(int(s) for s in spread_starts(n, length, count))
        last_k = st.session_state[bounded("attn_last_k", 1, length, min(8, length))]  # set on Head statistics
        if st.button("Compute statistics over many windows", type="primary") or st.session_state.get("_attn_many"):
            st.session_state["_attn_many"] = True
            summary = _summary(ckpt.digest, assumptions, data_key, starts, length, last_k, model, fm.values)
            st.caption(
                f"Mean over {summary.n_windows} windows of length {length} from {name}; the table has the "
                "standard deviations."
            )
            show_stats(
                {"all": summary.stats, "deciding": summary.decision_stats},
                summary.future_by_query,
                last_k,
                length,
                cfg.causal,
                "many",
            )
