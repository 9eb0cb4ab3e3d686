"""Widgets and result panels of the What-if page (Streamlit glue; the math is in analysis/whatif.py)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from .. import plots
from ..analysis import whatif as wi
from ..data import FeatureMatrix, rolling_windows
from . import download_table
from .session import keep, window_by_time


def requested(clicked: bool, key: str, settings: tuple) -> bool:
    """Whether on-demand work should show: its button was pressed for exactly these settings, now or earlier in
    this session. Changed settings show a note instead of silently recomputing (the work can take minutes)."""
    if clicked:
        st.session_state[key] = settings
    stored = st.session_state.get(key)
    if stored is not None and stored != settings:
        st.info("The settings changed since the last run: press the button to run it for these.")
    return stored == settings


def cells_controls(
    names: tuple[str, ...],
    length: int,
    key: str,
    all_features: bool = False,
) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Features (all, or a multiselect) and a time range of offsets (0 = decision bar)
    -> (feature indices, (start, stop))."""
    c1, c2 = st.columns([3, 2])
    if c1.toggle("All features", all_features, key=keep(f"{key}_all")):
        chosen = list(names)
    else:
        chosen = c1.multiselect("Features", names, list(names[:1]), key=keep(f"{key}_feat"))
    lo, hi = (
        c2.slider("Time steps (0 = decision bar)", -(length - 1), 0, (-(length - 1), 0), key=keep(f"{key}_time"))
        if length > 1
        else (0, 0)
    )
    return tuple(names.index(c) for c in chosen), (lo + length - 1, hi + length)


def edit_controls(fm: FeatureMatrix, length: int, key: str) -> tuple[wi.Edit, int | None]:
    """One edit (operation, features, time range, value) and, for copying, the first row of the other window."""
    o1, o2 = st.columns([2, 1])
    op = o1.selectbox("Edit", wi.EDIT_OPS, key=keep(f"{key}_op"), help="Values are in the model's normalised units.")
    value = o2.number_input(
        "Value",
        value=1.0 if op == wi.MULTIPLY else 0.0,
        step=0.25,
        key=keep(f"{key}_value"),
        disabled=op not in (wi.SET, wi.ADD, wi.MULTIPLY),
        format="%.3f",
    )
    st.caption(wi.EDIT_NOTES[op])
    feats, (start, stop) = cells_controls(fm.names, length, key)
    source = (
        window_by_time(fm.times, length, f"{key}_src_when", "Copy from the window ending at") if op == wi.COPY else None
    )
    return wi.Edit(op, feats, start, stop, float(value)), source


def show_edit(res: wi.EditResult) -> None:
    """Before/after bars and what changed."""
    left, right = st.columns([2, 1])
    left.plotly_chart(plots.before_after_bars(res.before, res.after, res.action_names, "Decision before and after"))
    right.metric(
        "Decision",
        res.decision_after,
        None if res.decision_after == res.decision_before else f"was {res.decision_before}",
        delta_color="off",
    )
    right.metric("Cells changed", res.changed_cells)
    change = res.after - res.before
    right.caption(" · ".join(f"{a} {d:+.1%}" for a, d in zip(res.action_names, change)))


def show_flip(flip: wi.FlipResult, rival: wi.FlipResult | None, key: str) -> None:
    """Verified verdict, size of the edit, before/after bars, the perturbation heatmap and the edited cells."""
    if flip.flipped:
        st.success(
            f"Verified: a plain forward of the edited window decides **{flip.target_name}** "
            f"(logit margin {flip.margin:+.3f})."
        )
    else:
        st.error(f"No flip to {flip.target_name} found: " + " ".join(flip.notes[1:]))
    k = st.columns(5)
    k[0].metric("Cells edited", flip.n_cells)
    k[1].metric("L1 (input units)", f"{flip.l1:.3g}")
    k[2].metric("L∞ (input units)", f"{flip.linf:.3g}")
    k[3].metric("Forward equivalents", flip.evaluations)
    k[4].metric("Time", f"{flip.seconds:.1f} s")
    st.caption(flip.notes[0])
    if rival is not None:
        verdict = f"flipped with L1 {rival.l1:.3g} over {rival.n_cells} cells" if rival.flipped else "found no flip"
        st.caption(f"Random directions with the same budget ({rival.evaluations} forward evaluations) {verdict}.")
    left, right = st.columns([1, 2])
    left.plotly_chart(
        plots.before_after_bars(flip.before, flip.after, flip.action_names, "Decision", "after the smallest edit"),
        key=f"{key}_bars",
    )
    offsets = np.arange(len(flip.window)) - (len(flip.window) - 1)
    right.plotly_chart(
        plots.attribution_heatmap(
            flip.delta, flip.feature_names, offsets, f"Perturbation that makes it {flip.target_name}", "change"
        ),
        key=f"{key}_map",
    )
    cells = flip.cells()
    st.dataframe(cells.head(200), hide_index=True)
    download_table(cells, f"flip_to_{flip.target_name}", key=f"{key}_cells", label="Edited cells")


@st.cache_data(max_entries=64, show_spinner=False)
def runner_up(model_key: tuple, data_key: str, start: int, length: int, _model, _values) -> int:
    """The runner-up class of the window at `start` (cached: a forward pass of the full model takes a second on a
    busy machine, and every rerun of the page asks for this default)."""
    return wi.runner_up(_model, _values[start : start + length])


@st.cache_data(max_entries=64, show_spinner=False)
def edit_result(
    model_key: tuple, data_key: str, start: int, length: int, edit: tuple, source: int | None, _model, _values, _means
):
    """The decision before and after one edit of the window at `start` (cached per model, data and edit)."""
    src = None if source is None else _values[source : source + length]
    return wi.evaluate_edits(_model, _values[start : start + length], [wi.Edit(*edit)], src, _means)


@st.cache_data(max_entries=16, show_spinner=False)
def flip_search(
    model_key: tuple,
    data_key: str,
    start: int,
    length: int,
    target: int,
    feats: tuple,
    steps: tuple,
    iterations: int,
    rival: bool,
    _model,
    _values,
    _names,
):
    """The smallest flipping edit found by gradient steps, and a random-direction rival with the same budget."""
    bar = st.progress(0.0, text="Searching for the smallest flipping edit…")
    window = _values[start : start + length]
    flip = wi.smallest_flip(
        _model,
        window,
        target,
        feats,
        steps,
        iterations,
        feature_names=_names,
        progress=lambda d, t: bar.progress(d / t, text=f"gradient step {d}/{t}"),
    )
    other = (
        wi.random_flip(_model, window, target, feats, steps, flip.evaluations, feature_names=_names) if rival else None
    )
    bar.empty()
    return flip, other


@st.cache_data(max_entries=16, show_spinner=False)
def stability_curve(model_key: tuple, data_key: str, length: int, starts: tuple, samples: int, _model, _values, _sigma):
    """Share of unchanged decisions against noise level, over the windows at `starts`."""
    bar = st.progress(0.0, text="Adding noise…") if len(starts) > 1 else None
    res = wi.decision_stability(
        _model,
        rolling_windows(_values, length),
        _sigma,
        n_samples=samples,
        indices=starts,
        progress=None if bar is None else lambda d, t: bar.progress(d / t, text=f"{d}/{t} windows"),
    )
    if bar is not None:
        bar.empty()
    return res.curve()
