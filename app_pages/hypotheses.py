"""Hypotheses: which heads, mask, norm placement and LoRA scale was this checkpoint trained with?"""

import streamlit as st

from flag_model import ui
from flag_model.analysis.hypotheses import (
    auto_screen,
    estimate_cost,
    labelled_data,
    rank_hypotheses,
    search_space,
)
from flag_model.data import DataError
from flag_model.features import LabelRule
from flag_model.ui import hypotheses as uh
from flag_model.ui.session import bounded

RESULT = "hyp_result"

st.title("Hypotheses")
st.caption(
    "Heads, attention mask, norm placement and LoRA scale cannot be read from the weights, and a wrong "
    "choice still loads strictly. On labelled data the checkpoint can tell: under the settings it was "
    "trained with, its loss is lower. Every combination is scored at the decision position of the same "
    "windows and ranked by mean NLL, with block-bootstrap intervals."
)
ckpt, model = ui.require_model()  # a file that does not load strictly has nothing to score (see Architecture)
cfg, in_use = ckpt.require_config(), model.config  # as stored / with the sidebar's assumptions
name, ohlcv = (market := ui.market_data()).name, market.frame
rule, rule_source = LabelRule.from_meta(ckpt.meta)
st.markdown(
    f"Data: **{ui.md_escape(name)}** (upload your own OHLCV on **Predictions**). Labels ({rule_source}): "
    f"{rule.describe()}."
)

n_windows, lengths, heads, scales = uh.controls(ckpt)
if not (lengths and heads and scales):
    st.info("Choose at least one window length, head count and LoRA scale.")
    st.stop()


@st.cache_data(max_entries=4, show_spinner="Computing features and labels…")
def _data(digest: str, ohlcv, n: int, longest: int, _meta: dict, state_dim: int):
    return labelled_data(ohlcv, _meta, state_dim, n, longest)


@st.cache_data(max_entries=8, show_spinner="Estimating the cost (a timed probe)…")
def _cost(digest: str, space, n: int, screen: int, keep: int, _sd, _cfg):
    return estimate_cost(_sd, _cfg, space, n, screen, keep)


space = search_space(cfg, ckpt.meta, lengths, heads, scales)
st.dataframe(space.table(), hide_index=True, width="stretch", key="hyp_space")
try:
    data = _data(ckpt.digest, ohlcv, int(n_windows), max(lengths), dict(ckpt.meta), cfg.state_dim)
except (DataError, ValueError) as exc:
    st.error(f"Could not label windows from {ui.md_escape(name)}: {ui.md_escape(exc)}")
    st.stop()
for w in data.warnings:
    st.warning(w)
c = st.columns(2)
screen = c[0].number_input(
    "Screening windows (0: every combination on every window)",
    0,
    int(n_windows),
    step=16,
    key=bounded("hyp_screen", 0, int(n_windows), auto_screen(cfg, space, len(data)), tag=(len(space), len(data))),
    help="Score all combinations on this many windows first (fast engine), then only the "
    "best on all windows in float32.",
)
n_keep = c[1].number_input(
    "Combinations kept after screening", 1, len(space), key=bounded("hyp_keep", 1, len(space), min(8, len(space)))
)
cost = _cost(ckpt.digest, space, len(data), int(screen), int(n_keep), ckpt.state_dict, cfg)
st.info(
    f"**Cost:** {cost.text()}. {cost.merges} LoRA merge(s); the embedding is shared by all combinations of "
    f"a scale. Final scores in float32 ({data.normalisation} normalisation)."
)

key = (ckpt.digest, name, len(data), tuple(data.ends[:3]), space, int(screen), int(n_keep))
buttons = st.columns([1, 1, 4])
run = buttons[0].button("Rank", type="primary", key="hyp_run")
if buttons[1].button("Stop", key="hyp_stop"):  # a click during a run interrupts it (Streamlit reruns the script)
    st.warning("Stopped. Press **Rank** to start again.")
if run:
    bar = st.progress(0.0, text="Scoring…")
    ranking = rank_hypotheses(
        ckpt.state_dict,
        cfg,
        data,
        space,
        screen=int(screen),
        keep=int(n_keep),
        progress=lambda d, t, what: bar.progress(d / max(t, 1), text=f"{d:,}/{t:,} · {what}"),
    )
    bar.empty()
    st.session_state[RESULT] = (key, ranking)
result = st.session_state.get(RESULT)
if result is None or result[0] != key:
    st.info("Press **Rank** to score every combination.")
    st.stop()
ranking = result[1]

uh.ranking_view(ranking, in_use)
uh.adopt(ranking, ckpt.digest, in_use)
