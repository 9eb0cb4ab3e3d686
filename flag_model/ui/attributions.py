"""Cached computations of the Attributions page, each with progress for work that takes more than a second."""
from __future__ import annotations

import numpy as np
import streamlit as st

from ..analysis import attribution as attr
from ..data import rolling_windows
from . import LazyProgress


@st.cache_data(max_entries=32, show_spinner=False)
def attribute(model_key: tuple, data_key: str, start: int, length: int, method: str, opts: tuple,
              _model, _values: np.ndarray, _means: np.ndarray, _names) -> attr.AttributionResult:
    """One window (rows start..start+length-1 of _values); opts: attr.attribute's keyword arguments as items."""
    bar = LazyProgress()  # made here, so a cache hit replays nothing visible
    result = attr.attribute(_model, _values[start:start + length], method, feature_mean=_means,
                            feature_names=_names, progress=bar, **dict(opts))
    bar.done()
    return result


@st.cache_data(max_entries=8, show_spinner=False)
def global_importance(model_key: tuple, data_key: str, length: int, count: int, method: str, opts: tuple,
                      _model, _values: np.ndarray, _means: np.ndarray, _names) -> attr.GlobalImportance:
    """`count` windows of `length` spread evenly over _values."""
    bar = st.progress(0.0, text="Attributing many windows…")
    windows = rolling_windows(_values, length)
    result = attr.global_importance(
        _model, windows, attr.evenly_spaced(len(windows), count), method, feature_mean=_means, feature_names=_names,
        progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total} windows"), **dict(opts))
    bar.empty()
    return result
