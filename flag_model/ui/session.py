"""What a session keeps while the analyst moves between pages: widget settings, the current market data, and
the widgets whose ranges depend on the data (clamped instead of failing).

Streamlit forgets a widget's value when a run does not draw it (another page is open). Its documented remedy
is to re-assert the key in `st.session_state` at the start of every run, which turns the value into session
state that outlives the widget. That is done here for every settings widget whose key is registered with
`keep(key)` (or `bounded`/`choice`/`subset`, which also fit a kept value into a changed range). Trigger
widgets (buttons, uploads, chart or table selections) are never registered: Streamlit refuses to set their
state. tests/test_session_state.py checks every page: each settings widget kept, no trigger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from ..data import bar_interval, default_window

_KEPT_KEYS = "_flag_kept_keys"  # the set of registered settings keys of this session
MARKET = "market_data"  # this session's MarketData, set on the Predictions page
_SLOT = "_flag_data_slot"  # the sidebar placeholder of the current-data entry, redrawn when the data change


def keep(key: str) -> str:
    """Register a settings widget's key to be kept across pages (use as `key=keep("pred_mode")`); -> the key.
    Never for trigger widgets (buttons, uploads, chart or table selections): Streamlit refuses to set those."""
    st.session_state.setdefault(_KEPT_KEYS, set()).add(key)
    return key


def kept(key: object) -> bool:
    """Whether a session-state key is a registered settings widget."""
    return key in st.session_state.get(_KEPT_KEYS, ())


def keep_widget_state() -> None:
    """Re-assert every registered key (call at the start of each run, before any widget is drawn)."""
    for key in list(st.session_state.get(_KEPT_KEYS, ())):
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def bounded(key: str, lo: Any, hi: Any, default: Any, tag: object = None) -> str:
    """A kept value clamped into [lo, hi] (the range changes with the data), else `default`; a new `tag` (e.g.
    another data set) starts again from `default`. Returns the key, for a widget drawn without its own `value`."""
    keep(key)
    if tag is not None and st.session_state.get(f"_{key}_tag", tag) != tag:
        st.session_state.pop(key, None)
    if tag is not None:
        st.session_state[f"_{key}_tag"] = tag
    value = st.session_state.get(key, default)
    try:
        value = min(max(value, lo), hi)
    except TypeError:
        value = default
    st.session_state[key] = value
    return key


def choice(key: str, options: Sequence[Any], default: Any) -> str:
    """A kept selection that is still among `options`, else `default`. Returns the key."""
    keep(key)
    if st.session_state.get(key, default) not in options:
        st.session_state[key] = default
    st.session_state.setdefault(key, default)
    return key


def subset(key: str, options: Sequence[Any], default: Sequence[Any]) -> str:
    """A kept multiselection without the values no longer among `options` (default when never set)."""
    keep(key)
    st.session_state[key] = [v for v in st.session_state.get(key, default) if v in options]
    return key


@dataclass(frozen=True)
class MarketData:
    """The OHLCV bars the model pages use: name, frame (datetime, timestamp, open, high, low, close, volume)
    and where they came from ("upload", "server path" or "demo")."""

    name: str
    frame: pd.DataFrame
    source: str


def describe(data: MarketData) -> str:
    """ "name · 51,852 rows · 5 min bars · upload" for the sidebar."""
    return f"{data.name} · {len(data.frame):,} rows · {bar_interval(data.frame['datetime']).text} bars · {data.source}"


def draw_data_slot(data: MarketData) -> None:
    """The sidebar's current-data entry (a placeholder that `set_market` fills again when the data change)."""
    st.session_state[_SLOT] = slot = st.sidebar.empty()
    _fill(slot, data)


def _fill(slot, data: MarketData) -> None:
    from . import md_escape

    slot.caption(f":material/table_chart: **Current data**: {md_escape(describe(data))}")


def set_market(data: MarketData | None) -> None:
    """Make `data` the session's current data (None: back to the demo market) and redraw the sidebar entry."""
    from . import market_data

    if data is None:
        st.session_state.pop(MARKET, None)
    else:
        st.session_state[MARKET] = data
    slot = st.session_state.get(_SLOT)
    if slot is not None:
        _fill(slot, market_data())


def int_slider(where, label: str, lo: int, hi: int, value: int, **kwargs) -> int:
    """A slider over lo..hi, or (when the range holds one value, e.g. a model with max_length 1) that value as a
    caption: Streamlit refuses a slider whose min equals its max."""
    if hi <= lo:
        where.caption(f"{label}: {lo} (the only possible value)")
        return lo
    return where.slider(label, lo, hi, min(max(value, lo), hi), **kwargs)


def window_length(where, meta: dict, max_length: int, n_rows: int, key: str) -> int:
    """The "Window length" slider of every page: 1..min(max_length, n_rows), starting at the window the checkpoint's
    metadata names (data.default_window, the one home of that convention)."""
    top = min(max_length, n_rows)
    dflt = min(default_window(meta, max_length), top)
    return int_slider(where, "Window length", 1, top, dflt, key=bounded(key, 1, top, dflt))


def window_by_time(
    times: pd.DatetimeIndex, length: int, key: str, label: str = "Decision bar (last bar of the window)", container=st
) -> int:
    """A window of `length` rows chosen by the date and time of its last bar; -> its first row. The slider
    steps by the median bar interval and snaps to the latest bar at or before the chosen time."""
    ends = times[length - 1 :]
    if len(ends) <= 1:
        return 0
    lo, hi = ends[0].to_pydatetime(), ends[-1].to_pydatetime()
    step = max((ends[1:] - ends[:-1]).median(), pd.Timedelta(minutes=1)).to_pytimedelta()
    when = container.slider(label, lo, hi, step=step, format="YYYY-MM-DD HH:mm", key=bounded(key, lo, hi, hi))
    return int(np.clip(ends.searchsorted(pd.Timestamp(when), side="right") - 1, 0, len(ends) - 1))
