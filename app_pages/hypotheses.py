"""Hypotheses: which heads, mask, norm placement and LoRA scale was this checkpoint trained with?"""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis.hypotheses import (
    DEFAULT_WINDOWS,
    assumptions_of,
    auto_screen,
    candidate_heads,
    candidate_scales,
    estimate_cost,
    labelled_data,
    mark_in_use,
    rank_hypotheses,
    search_space,
    verdict,
)
from flag_model.data import DataError, default_window
from flag_model.features import LabelRule
from flag_model.ui.session import bounded, choice, subset

RESULT = "hyp_result"

st.title("Hypotheses")
st.caption(
    "Heads, attention mask, norm placement and LoRA scale cannot be read from the weights, and a wrong "
    "choice still loads strictly. On labelled data the checkpoint can tell: under the settings it was "
    "trained with, its loss is lower. Every combination is scored at the decision position of the same "
    "windows and ranked by mean NLL, with block-bootstrap intervals."
)
ckpt, _ = ui.require_model()  # a file that does not load strictly has nothing to score (see Architecture)
cfg, in_use = ckpt.config, ui.loaded().config
name, ohlcv = (market := ui.market_data()).name, market.frame
rule, rule_source = LabelRule.from_meta(ckpt.meta)
st.markdown(
    f"Data: **{ui.md_escape(name)}** (upload your own OHLCV on **Predictions**). Labels ({rule_source}): "
    f"{rule.describe()}."
)

c = st.columns(4)
n_windows = c[0].number_input(
    "Labelled windows",
    16,
    20_000,
    step=16,
    key=bounded("hyp_windows", 16, 20_000, DEFAULT_WINDOWS),
    help="Spread evenly over the data; more windows give narrower intervals.",
)
stored_window = default_window(ckpt.meta, cfg.max_length)
length_options = sorted({w for w in (16, 32, 64, 128, 256) if w <= cfg.max_length} | {stored_window})
lengths = c[1].multiselect("Window lengths", length_options, key=subset("hyp_lengths", length_options, [stored_window]))
heads_all, scales_all = candidate_heads(cfg), candidate_scales(cfg)
heads = c[2].multiselect(
    "Heads",
    heads_all,
    key=subset("hyp_heads", heads_all, list(heads_all)),
    help="Divisors of d with head width ≥ 8, and a stored head count.",
)
scale_options = [s for s, _ in scales_all]
scales = c[3].multiselect(
    "LoRA scales",
    scale_options,
    key=subset("hyp_scales", scale_options, scale_options),
    help="; ".join(f"{s:g}: {src}" for s, src in scales_all),
)
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
c = st.columns([1, 1, 4])
run = c[0].button("Rank", type="primary", key="hyp_run")
if c[1].button("Stop", key="hyp_stop"):  # a click during a run interrupts it (Streamlit reruns the script)
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

best = ranking.table.iloc[0]
st.success(
    f"Best: **{best['label']}** — NLL {best['nll']:.4f} [{best['nll_low']:.4f}, {best['nll_high']:.4f}], "
    f"best in {best['share_best']:.0%} of {ranking.resamples} resamples ({ranking.seconds:.0f} s, "
    f"{ranking.precision})."
)
clear, sentence = verdict(ranking)
(st.info if clear else st.warning)(sentence)
table = mark_in_use(ranking.table, in_use) if in_use is not None else ranking.table
st.dataframe(
    table.drop(columns=["label"]).style.format(
        {c: "{:.4f}" for c in ("nll", "nll_low", "nll_high", "brier", "ece")}
        | {c: "{:.3f}" for c in ("accuracy", "accuracy_low", "accuracy_high", "f1", "f1_low", "f1_high")}
        | {"share_best": "{:.1%}", "lora_scale": "{:g}"}
    ),
    hide_index=True,
    width="stretch",
    key="hyp_table",
)
ui.download_table(table, "hypotheses_ranking", key="hyp_dl", label="Ranking as")
st.caption(
    f"{ranking.level:.0%} intervals: {ranking.resamples} circular block-bootstrap resamples of the {ranking.n_windows} "
    f"windows (blocks of {ranking.block_length}); **share_best**: share of resamples in which the entry has the "
    "lowest NLL. Screened-out entries were scored on the screening windows only."
)
st.plotly_chart(plots.hypothesis_intervals(ranking.table), width="stretch")

st.subheader("Adopt")
entries = list(range(min(len(ranking.table), 20)))
pick = st.selectbox(
    "Entry",
    entries,
    key=choice("hyp_pick", entries, 0),
    format_func=lambda i: f"#{i + 1}: {ranking.table.iloc[i]['label']}",
)
chosen = ranking.table.iloc[int(pick)]
st.button(
    "Adopt in the sidebar",
    key="hyp_adopt",
    on_click=ui.set_assumptions,
    args=(ckpt.digest,),
    kwargs=assumptions_of(chosen),
    help="Sets heads, mask, norm placement and LoRA scale in the sidebar.",
)
if in_use is not None:
    st.caption(
        f"Sidebar now: {in_use.num_heads} heads · {'pre' if in_use.norm_first else 'post'}-norm · "
        f"{'causal' if in_use.causal else 'no mask'} · LoRA ×{in_use.lora_scale:g}. The window length is "
        "not a sidebar setting; use the best one on the other pages."
    )
