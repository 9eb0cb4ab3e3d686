"""The "How faithful" panel of the Attributions page: which attribution method to believe on this model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import streamlit as st

from .. import plots
from ..analysis import attribution as attr
from ..analysis import faithfulness as fa
from . import download_table
from .session import keep
from .whatif import requested

_KEYS = ("target", "position", "baseline", "output")  # the Attributions page's options that apply here


@st.cache_data(max_entries=8, show_spinner=False)
def _measure(
    model_key: tuple,
    data_key: str,
    start: int,
    length: int,
    methods: tuple,
    opts: tuple,
    steps: int,
    n_random: int,
    _model,
    _values,
    _means,
) -> fa.Faithfulness:
    bar = st.progress(0.0, text="Measuring faithfulness…")
    res = fa.faithfulness(
        _model,
        _values[start : start + length],
        methods,
        feature_mean=_means,
        steps=steps,
        n_random=n_random,
        progress=lambda f, msg: bar.progress(f, text=msg),
        **dict(opts),
    )
    bar.empty()
    return res


@st.cache_data(max_entries=8, show_spinner=False)
def _randomise(
    model_key: tuple,
    data_key: str,
    start: int,
    length: int,
    methods: tuple,
    opts: tuple,
    steps: int,
    _model,
    _values,
    _means,
):
    bar = st.progress(0.0, text="Re-initialising adapters on a copy…")
    res = fa.randomisation_check(
        _model,
        _values[start : start + length],
        methods,
        feature_mean=_means,
        steps=steps,
        progress=lambda f, msg: bar.progress(f, text=msg),
        **dict(opts),
    )
    bar.empty()
    return res


def faithfulness_panel(
    model: Any,
    model_key: tuple,
    data_key: str,
    values: np.ndarray,
    start: int,
    length: int,
    opts: Mapping[str, Any],
    means: np.ndarray,
) -> None:
    """Deletion/insertion against random orders, Captum infidelity and sensitivity, and the randomisation
    check for the window values[start:start + length], with the page's class, deciding step and baseline."""
    st.subheader("How faithful")
    st.caption(
        "Deletion: cells set to the baseline in the method's order (most positive first) — a faithful method "
        "makes the class probability fall faster than random orders (smaller area). Insertion: cells copied "
        "into the baseline — it should rise faster (larger area). Infidelity (Captum): squared error between "
        "attributed and real output change when random 10 % of cells go to the baseline (lower is better). "
        "Sensitivity max (Captum): largest relative change of the attributions under input noise of radius "
        "0.1 (lower is more stable)."
    )
    c1, c2, c3 = st.columns([3, 1, 1])
    methods = c1.multiselect(
        "Methods", attr.METHODS, [attr.IG, attr.SALIENCY, attr.IXG, attr.ABLATION], key=keep("faith_methods")
    )
    n_random = c2.number_input("Random orders", 1, 64, 4, key=keep("faith_random"))
    steps = c3.number_input("Steps (IG, GradientSHAP)", 2, 256, 32, key=keep("faith_steps"))
    chosen = tuple((k, opts[k]) for k in _KEYS)
    if not methods:
        st.info("Choose at least one method.")
        return
    args = (model_key, data_key, start, length, tuple(methods), chosen, int(steps))
    if requested(st.button("Measure faithfulness", key="faith_run"), "_faith_run", (*args, int(n_random))):
        res = _measure(*args, int(n_random), model, values, means)
        st.caption(f"Explaining **{res.target_name}** on this window; {res.seconds:.1f} s.")
        st.dataframe(res.table, hide_index=True)
        download_table(res.table, "faithfulness", key="faith_table")
        shown = st.selectbox("Curves of", list(res.curves), key=keep("faith_curve"))
        st.plotly_chart(plots.deletion_insertion_lines(res.curves[shown].frame(), f"{shown}: deletion and insertion"))
    st.caption(
        "Randomisation check: the LoRA adapters are re-initialised from the top block down on a private copy "
        "(A as at creation, B random with the trained B's spread); a method whose attributions stay highly "
        "rank-correlated with the original explains the input more than what the model learned."
    )
    if requested(st.button("Run the randomisation check", key="faith_rand"), "_faith_rand", args):
        table = _randomise(*args, model, values, means)
        st.plotly_chart(plots.randomisation_lines(table))
        download_table(table, "randomisation_check", key="faith_rand_table")
