"""Streamlit pieces of the Hypotheses page: the search-space controls, the ranking view and the adopt button (the
scoring lives in flag_model.analysis.hypotheses)."""

from __future__ import annotations

import streamlit as st

from .. import plots
from ..analysis.hypotheses import (
    DEFAULT_WINDOWS,
    Ranking,
    assumptions_of,
    candidate_heads,
    candidate_scales,
    mark_in_use,
    verdict,
)
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..data import default_window
from .session import bounded, choice, subset


def controls(ckpt: Checkpoint) -> tuple[int, list[int], list[int], list[float]]:
    """Labelled windows, window lengths, head counts and LoRA scales to try (the lists may be empty)."""
    cfg = ckpt.require_config()
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
    lengths = c[1].multiselect(
        "Window lengths", length_options, key=subset("hyp_lengths", length_options, [stored_window])
    )
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
    return int(n_windows), lengths, heads, scales


def ranking_view(ranking: Ranking, in_use: ModelConfig | None) -> None:
    """The best entry, the verdict, the ranking table (with its download) and the interval plot."""
    from . import download_table

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
    download_table(table, "hypotheses_ranking", key="hyp_dl", label="Ranking as")
    st.caption(
        f"{ranking.level:.0%} intervals: {ranking.resamples} circular block-bootstrap resamples of the "
        f"{ranking.n_windows} windows (blocks of {ranking.block_length}); **share_best**: share of resamples in "
        "which the entry has the lowest NLL. Screened-out entries were scored on the screening windows only."
    )
    st.plotly_chart(plots.hypothesis_intervals(ranking.table), width="stretch")


def adopt(ranking: Ranking, digest: str, in_use: ModelConfig | None) -> None:
    """Pick one of the top 20 entries and set its assumptions in the sidebar."""
    from . import set_assumptions

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
        on_click=set_assumptions,
        args=(digest,),
        kwargs=assumptions_of(chosen),
        help="Sets heads, mask, norm placement and LoRA scale in the sidebar.",
    )
    if in_use is not None:
        st.caption(
            f"Sidebar now: {in_use.num_heads} heads · {'pre' if in_use.norm_first else 'post'}-norm · "
            f"{'causal' if in_use.causal else 'no mask'} · LoRA ×{in_use.lora_scale:g}. The window length is "
            "not a sidebar setting; use the best one on the other pages."
        )
