"""Widgets and cached computations of the Attributions page (the page wires them together); work that takes more
than a second shows progress."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from .. import plots
from ..analysis import attribution as attr
from ..data import evenly_spaced, rolling_windows
from . import LazyProgress, int_slider
from .session import bounded, keep


@st.cache_data(max_entries=32, show_spinner=False)
def attribute(
    model_key: tuple,
    data_key: str,
    start: int,
    length: int,
    method: str,
    opts: tuple,
    _model,
    _values: np.ndarray,
    _means: np.ndarray,
    _names,
) -> attr.AttributionResult:
    """One window (rows start..start+length-1 of _values); opts: attr.attribute's keyword arguments as items."""
    bar = LazyProgress()  # made here, so a cache hit replays nothing visible
    result = attr.attribute(
        _model,
        _values[start : start + length],
        method,
        feature_mean=_means,
        feature_names=_names,
        progress=bar,
        **dict(opts),
    )
    bar.done()
    return result


@st.cache_data(max_entries=8, show_spinner=False)
def global_importance(
    model_key: tuple,
    data_key: str,
    length: int,
    count: int,
    method: str,
    opts: tuple,
    _model,
    _values: np.ndarray,
    _means: np.ndarray,
    _names,
) -> attr.GlobalImportance:
    """`count` windows of `length` spread evenly over _values."""
    bar = st.progress(0.0, text="Attributing many windows…")
    windows = rolling_windows(_values, length)
    result = attr.global_importance(
        _model,
        windows,
        evenly_spaced(len(windows), count),
        method,
        feature_mean=_means,
        feature_names=_names,
        progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total} windows"),
        **dict(opts),
    )
    bar.empty()
    return result


@dataclass(frozen=True)
class MoreOptions:
    """The "More options" expander: what f is, IG's auto steps, the occlusion patch and the top-k shown."""

    output: str
    threshold: float
    auto: bool
    max_steps: int
    patch: tuple[int, int]
    top_k: int


def more_options(length: int, state_dim: int) -> MoreOptions:
    with st.expander("More options"):
        o1, o2, o3, o4 = st.columns(4)
        output = o1.radio(
            "Explain the",
            attr.OUTPUTS,
            horizontal=True,
            key=keep("attr_output"),
            help="Logits are additive: IG's completeness f(x) − f(baseline) = Σ attributions holds in logit units.",
        )
        st.session_state.setdefault("attr_auto", True)
        auto = o2.toggle(
            "Auto steps (IG)",
            key=keep("attr_auto"),
            help="Double the steps until the relative delta is below the threshold.",
        )
        threshold = o2.number_input(
            "Threshold (relative delta)", 0.001, 1.0, format="%.3f", key=bounded("attr_threshold", 0.001, 1.0, 0.05)
        )
        max_steps = o3.number_input("Step cap", 1, 4096, key=bounded("attr_max_steps", 1, 4096, 800))
        patch = (
            o3.number_input(
                "Occlusion patch: steps", 1, length, key=bounded("attr_patch_t", 1, length, min(8, length))
            ),
            o4.number_input("Occlusion patch: features", 1, state_dim, key=bounded("attr_patch_f", 1, state_dim, 1)),
        )
        lo = min(5, state_dim)
        top_k = int_slider(
            o4,
            "Top features shown",
            lo,
            state_dim,
            min(20, state_dim),
            key=bounded("attr_top_k", lo, state_dim, min(20, state_dim)),
        )
    return MoreOptions(output, float(threshold), bool(auto), int(max_steps), (int(patch[0]), int(patch[1])), int(top_k))


def show_result(res: attr.AttributionResult, actions: tuple[str, ...], threshold: float) -> None:
    """Class probabilities, f(x), f(baseline), Σ attributions, time, and the completeness verdict."""
    left, right = st.columns([1, 2])
    left.plotly_chart(plots.class_probabilities(res.probabilities, actions, res.target_name))
    with right:
        k1, k2, k3, k4 = st.columns(4)
        k1.metric(f"f(x): {res.output} of {res.target_name}", f"{res.f_input:.3f}")
        k2.metric("f(baseline)", f"{res.f_baseline:.3f}")
        k3.metric("Σ attributions", f"{res.attributions.sum():.3f}")
        k4.metric(f"time ({res.steps} steps)" if res.steps else "time", f"{res.seconds:.2f} s")
        level, message = attr.completeness(res, threshold)
        {"good": st.success, "fair": st.warning, "poor": st.error, "n/a": st.info}[level](message)
        for note in res.notes:
            st.caption(note)


def global_panel(
    model_key: tuple, data_key: str, length: int, opts: dict, args: tuple, actions: tuple[str, ...], top_k: int
) -> None:
    """Global importance over many windows (on request): ranked features and their split by predicted class.
    `opts`: the single-window options (the window-specific ones are dropped); `args`: model, values, means, names."""
    from . import download_table

    st.subheader("Global importance over many windows")
    g1, g2 = st.columns(2)
    count = g1.slider(
        "Windows (spread evenly over the data)", 10, 1000, step=10, key=bounded("attr_count", 10, 1000, 200)
    )
    g_method = g2.selectbox(
        "Method",
        attr.METHODS,
        index=attr.METHODS.index(attr.IXG),
        key=keep("attr_global_method"),
        help="Input × Gradient and Saliency cost one pass per batch; IG costs `steps` passes.",
    )
    g_opts = {
        k: opts[k]
        for k in ("target", "position", "baseline", "steps", "internal_batch_size", "output", "occlusion_patch")
    }
    clicked = st.button("Compute global importance", type="primary", key="attr_global")
    if clicked or st.session_state.get("_attr_global"):
        st.session_state["_attr_global"] = True
        gi = global_importance(model_key, data_key, length, count, g_method, tuple(g_opts.items()), *args)
        table = gi.table()
        counts = ", ".join(f"{a} {c}" for a, c in gi.class_counts().items())
        st.caption(
            f"{len(gi.totals)} windows in {gi.seconds:.1f} s, each explained for "
            f"{'its predicted class' if opts['target'] is None else actions[opts['target']]}; predicted: {counts}. "
            "Bars: mean |attribution summed over time|; red/blue: the mean is for/against the explained class."
        )
        b1, b2 = st.columns(2)
        b1.plotly_chart(plots.global_importance_bars(table, top_k))
        b2.plotly_chart(plots.class_breakdown_bars(table, actions, min(top_k, 12)))
        download_table(table, "global_importance", key="global_importance")
