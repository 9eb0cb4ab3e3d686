"""Widgets and cached computations of the Predictions page (the page itself only wires them together).

Uploaded data is cached by content digest; the inference engine by checkpoint digest, assumptions and
precision (it holds its own weight copies, so the shared model is never touched); predictions by
(model, data, settings).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pandas as pd
import streamlit as st

from .. import plots
from ..analysis.bootstrap import N_BOOT
from ..analysis.predict import (
    COLLAPSE_SHARE,
    Predictions,
    class_shares,
    collapse_alarm,
    decide,
    decision_rows,
    equity_curve,
    evaluate,
    label_text,
    predict_features,
    undecided_note,
)
from ..checkpoint import Checkpoint
from ..data import (
    MODES,
    NORMALISATIONS,
    ColumnMapping,
    DataError,
    FeatureMatrix,
    Issue,
    Prepared,
    checkpoint_features,
    column_features,
    default_window,
    detect_columns,
    drift_table,
    feature_candidates,
    horizon_text,
    prepare_features,
    prepare_ohlcv,
    read_table,
)
from ..engine import InferenceEngine
from ..features import (
    OHLCV_COLUMNS,
    SIMPLE60_NAMES,
    WARMUP,
    LabelRule,
    compute_features,
    feature_help,
    simple60_reference,
    too_few_bars,
)
from ..model import FlagTrader
from ..server_paths import ServerPathError
from . import data_tag, download_table, md_escape, server_path_input, shared_features, upload_limit_note
from .session import bounded, keep

UPLOAD_KEY = "pred_upload"
_KEPT_UPLOAD = "_flag_kept_market_upload"  # (name, bytes) of this session's uploaded market data
KINDS = ("OHLCV bars (simple-60 features)", "Precomputed feature columns")
QUICK_SECONDS = 1.0  # the default scores what the probe says this machine does in about this long (load included)
QUICK_BARS = (50, 5_000)  # ...but never fewer or more bars than these (a floor of 200 took 5+ s under load)
BARS_HELP = (
    f"By default what this machine scores in about {QUICK_SECONDS:g} s; raise it to score more history "
    "(up to all {scorable:,}, with a progress bar)."
)
_KEPT_RESULT = "_pred_result"  # (settings, Predictions) of this session's last scoring
_NONE = "—"


@st.cache_data(max_entries=4, show_spinner="Reading the file…")
def _read_bytes(digest: str, name: str, _data: bytes) -> pd.DataFrame:
    return read_table(_data, name)


@st.cache_data(max_entries=2, show_spinner="Reading the file…")
def _read_path(path: str, mtime: float, size: int) -> pd.DataFrame:
    return read_table(path)


def _remember_upload() -> None:
    up = st.session_state.get(UPLOAD_KEY)
    st.session_state[_KEPT_UPLOAD] = (up.name, up.getvalue()) if up is not None else None


def _forget_upload() -> None:
    st.session_state[_KEPT_UPLOAD] = None


def data_source() -> tuple[str, str, pd.DataFrame, str] | None:
    """An uploaded file (kept for the session: the uploader itself empties on a page switch) or a server path as
    (name, data key, raw frame, source); None when neither is given. An unreadable file gives an error and stops
    the page."""
    up = st.file_uploader(
        "Market data: CSV or Parquet with OHLCV bars or feature columns",
        type=["csv", "parquet", "pq"],
        key=UPLOAD_KEY,
        on_change=_remember_upload,
    )
    kept = st.session_state.get(_KEPT_UPLOAD) if up is None else None
    if kept is not None:
        c1, c2 = st.columns([4, 1])
        c1.caption(f"Using **{md_escape(kept[0])}**, uploaded earlier in this session.")
        c2.button("Forget it", key="pred_kept_forget", on_click=_forget_upload)
    else:
        st.caption(upload_limit_note())
    try:
        path = server_path_input(
            "…or a path on the server (for files above the upload limit)", keep("pred_path"), "ETH_USDT_5m.csv"
        )
        upload = (up.name, up.getvalue()) if up is not None else kept
        if upload is not None:
            name, data = upload
            digest = hashlib.sha256(data).hexdigest()
            return name, digest, _read_bytes(digest, name, data), "upload"
        if path is not None:
            stat = path.stat()
            return (
                path.name,
                f"{path}:{stat.st_mtime}:{stat.st_size}",
                _read_path(str(path), stat.st_mtime, stat.st_size),
                "server path",
            )
    except (DataError, ServerPathError, OSError) as exc:
        st.error(f"Could not read the market data: {md_escape(exc)}")
        st.stop()
    return None


def mapping_widgets(
    df: pd.DataFrame, state_dim: int, data_key: str
) -> tuple[str, ColumnMapping, list[str], str | None, bool]:
    """Input kind, column mapping (detected by name, editable), feature columns in order, price column for
    labels (feature mode) and the repair switch. Widget keys carry the data key: a new file starts from
    its own detected mapping."""
    tag = data_tag(data_key)
    detected = detect_columns(df.columns)
    columns = [str(c) for c in df.columns]
    options = [_NONE, *columns]
    ohlcv_found = not detected.missing()
    with st.expander("Column mapping and validation", expanded=not ohlcv_found):
        # OHLCV unless the user picks feature columns: a missing OHLCV column is an error naming it, never a
        # silent switch to treating open/high/low/close as features.
        kind = st.radio("Input", KINDS, index=0, horizontal=True, key=keep(f"pred_kind_{tag}"))
        roles = {}
        cols = st.columns(6)
        for i, role in enumerate(("time", *OHLCV_COLUMNS)):
            guess = getattr(detected, role)
            roles[role] = cols[i].selectbox(
                role,
                options,
                index=options.index(guess) if guess else 0,
                key=keep(f"pred_map_{role}_{tag}"),
                disabled=kind != KINDS[0] and role != "time",
            )
        mapping = ColumnMapping(**{r: (None if v == _NONE else v) for r, v in roles.items()})
        features: list[str] = []
        close = None
        if kind == KINDS[1]:
            candidates = feature_candidates(df, mapping)
            features = st.multiselect(
                f"Feature columns, in the model's input order (at most {state_dim})",
                candidates,
                default=candidates[:state_dim],
                key=keep(f"pred_features_{tag}"),
            )
            pick = st.selectbox(
                "Price column for labels and the equity check (optional)",
                options,
                index=options.index(mapping.close) if mapping.close else 0,
                key=keep(f"pred_price_{tag}"),
            )
            close = None if pick == _NONE else pick
        repair = st.checkbox(
            "Repair: drop unparseable times, sort, keep the last duplicate, carry missing values "
            "forward (each repair is listed below)",
            key=keep(f"pred_repair_{tag}"),
        )
    return kind, mapping, features, close, repair


@st.cache_data(max_entries=4, show_spinner="Validating…")
def prepare(
    data_key: str,
    kind: str,
    mapping: ColumnMapping,
    features: tuple[str, ...],
    close: str | None,
    repair: bool,
    state_dim: int,
    _df: pd.DataFrame,
) -> Prepared:
    if kind == KINDS[0]:
        prep = prepare_ohlcv(_df, mapping, repair)
        if prep.ok and len(prep.valid_frame()) <= WARMUP:  # the features would raise; say it like the other checks
            short = Issue("error", too_few_bars(len(prep.valid_frame())))
            return Prepared(None, (*prep.issues, short), prep.time_format)
        return prep
    return prepare_features(_df, list(features), mapping.time, state_dim, close, repair)


def show_issues(issues: tuple[Issue, ...], limit: int = 12) -> None:
    """Errors in red, warnings in orange; a long list is cut with a count."""
    for issue in issues[:limit]:
        (st.error if issue.severity == "error" else st.warning)(md_escape(issue.message))
    if len(issues) > limit:
        st.caption(f"…and {len(issues) - limit} more.")


@st.cache_data(max_entries=4, show_spinner="Computing features…")
def _features(
    digest: str, prep_key: tuple, normalisation: str, state_dim: int, _prepared: Prepared, _meta: dict
) -> FeatureMatrix:
    if not _prepared.feature_columns:
        return checkpoint_features(_prepared.frame, _meta, state_dim, normalisation)
    return column_features(_prepared.frame, list(_prepared.feature_columns), _meta, state_dim, normalisation)


def features(
    digest: str, prep_key: tuple, normalisation: str, state_dim: int, prepared: Prepared, meta: dict
) -> FeatureMatrix:
    """prep_key: everything `prepare` was called with (data key, kind, mapping, columns, price, repair). OHLCV
    bars with the checkpoint's normalisation (the default) come from the cache the other pages share (a second
    or more for the demo market, computed once for all pages)."""
    if not prepared.feature_columns and normalisation == NORMALISATIONS[0]:
        return shared_features(digest, state_dim, prepared.frame, meta)[0]
    return _features(digest, prep_key, normalisation, state_dim, prepared, meta)


@st.cache_resource(max_entries=4, show_spinner="Preparing the inference engine (merged weight copy)…")
def engine(digest: str, assumptions: tuple, precision: str, _model: FlagTrader) -> InferenceEngine:
    return InferenceEngine(_model, precision)


@st.cache_resource(max_entries=8, show_spinner="Timing the engine…")
def _bars_per_second(
    digest: str, assumptions: tuple, precision: str, window: int, mode: str, _engine: InferenceEngine
) -> float:
    """Bars this engine scores per second at this window and mode, timed once per process on 8 windows."""
    probe = np.zeros((8, window, _engine.config.state_dim), np.float32)
    last_only = mode == "rolling"
    _engine.run(probe[:1], last_only)  # the first call pays one-time kernel set-up
    start = time.perf_counter()
    _engine.run(probe, last_only)
    return len(probe) * (1 if last_only else window) / max(time.perf_counter() - start, 1e-6)


def quick_bars(
    digest: str, assumptions: tuple, precision: str, window: int, mode: str, engine: InferenceEngine, scorable: int
) -> int:
    """The default number of most recent bars to score: about QUICK_SECONDS of work on this machine, in
    hundreds, within QUICK_BARS and at most `scorable`."""
    rate = _bars_per_second(digest, assumptions, precision, window, mode, engine)
    bars = int(rate * QUICK_SECONDS)
    bars = bars // 100 * 100 if bars >= 200 else bars // 10 * 10
    return max(1, min(scorable, max(QUICK_BARS[0], min(QUICK_BARS[1], bars))))


def bars_to_score(data_key: str, scorable: int, quick: int) -> int:
    """The "Bars to score" input (default `quick`, kept until the data changes) and a button that asks for every
    scorable bar (scored with a progress bar, then kept for the session like any result)."""
    key = bounded("pred_last", 1, scorable, quick, data_key)
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    last = c1.number_input(
        "Bars to score (the most recent)", 1, scorable, step=100, key=key, help=BARS_HELP.format(scorable=scorable)
    )
    c2.button(
        f"Score all {scorable:,} bars",
        on_click=st.session_state.__setitem__,
        args=(key, scorable),
        disabled=last >= scorable,
        help="the whole history; a progress bar shows how far it is",
    )
    return int(last)


@st.cache_data(max_entries=6, show_spinner=False)
def _predictions(
    digest: str,
    assumptions: tuple,
    precision: str,
    prep_key: tuple,
    normalisation: str,
    window: int,
    mode: str,
    last: int,
    _engine: InferenceEngine,
    _fm: FeatureMatrix,
) -> Predictions:
    bar = st.progress(0.0, text="Running the model…")  # made here so that a cache hit replays nothing visible
    pred = predict_features(
        _fm,
        _engine,
        window,
        mode,
        last=last,
        progress=lambda done, total: bar.progress(done / total, text=f"{done:,} / {total:,} windows"),
    )
    bar.empty()
    return pred


def predictions(
    digest: str,
    assumptions: tuple,
    precision: str,
    prep_key: tuple,
    normalisation: str,
    window: int,
    mode: str,
    last: int,
    engine: InferenceEngine,
    fm: FeatureMatrix,
) -> Predictions:
    """Scores of the `last` most recent bars, with a progress bar; this session keeps its latest result, so
    coming back to the page never scores again (the shared cache may have dropped it for other sessions')."""
    settings = (digest, assumptions, precision, prep_key, normalisation, window, mode, last)
    kept = st.session_state.get(_KEPT_RESULT)
    if kept is not None and kept[0] == settings:
        return kept[1]
    pred = _predictions(*settings, engine, fm)
    st.session_state[_KEPT_RESULT] = (settings, pred)
    return pred


def offsets(names: tuple[str, ...]) -> np.ndarray:
    """One logit-offset slider per class (added before softmax and argmax), in a form: dragging or pressing
    arrow keys reruns nothing until "Apply" (a rerun of this page per key press froze the browser)."""
    with st.form("pred_offsets_form", border=False):
        cols = st.columns(len(names) + 1, vertical_alignment="bottom")
        values = [
            cols[i].slider(f"{n} offset", -3.0, 3.0, step=0.05, key=bounded(f"pred_offset_{n}", -3.0, 3.0, 0.0))
            for i, n in enumerate(names)
        ]
        cols[-1].form_submit_button("Apply offsets")
    return np.array(values)


def show_drift(fm: FeatureMatrix, meta: dict) -> None:
    """The drift table against the checkpoint's stored statistics, flagged inputs first, with its download."""
    drift = drift_table(fm, meta).sort_values("flags", key=lambda f: f == "", kind="stable")
    flagged = drift[drift["flags"] != ""]
    with st.expander(
        f"Drift against the checkpoint's stored statistics — {len(flagged)} of {len(drift)} inputs flagged"
    ):
        st.dataframe(
            drift.style.apply(lambda r: ["background-color: #fde2e1" if r["flags"] else ""] * len(r), axis=1),
            hide_index=True,
            width="stretch",
        )
        download_table(drift, "drift", key="pred_drift")


def _interval(ci: tuple[float, float], pct: bool) -> str:
    return f"{ci[0]:.1%} – {ci[1]:.1%}" if pct else f"{ci[0]:.3f} – {ci[1]:.3f}"


def show_metrics(pred: Predictions, actions: np.ndarray, rule: LabelRule, bar: pd.Timedelta | None) -> None:
    """Accuracy and F1 with block-bootstrap intervals, the majority baseline, the confusion matrix, per-class
    scores and (blocks mode) accuracy by position with its band — each table with a download."""
    metrics = evaluate(pred, actions, n_boot=N_BOOT, block=max(pred.window, rule.horizon))
    if metrics is None or metrics.intervals is None:  # no labels (intervals always come with n_boot > 0)
        return
    ci = metrics.intervals
    st.subheader("Against labels")
    st.caption(
        f"{label_text(rule, bar)}. {metrics.n:,} scored bars have a label. Ranges: {ci.level:.0%} block-bootstrap "
        f"intervals ({ci.n_boot:,} replicates, {ci.method}) — neighbouring bars are not independent."
    )
    c = st.columns(4)
    c[0].metric(
        "Accuracy",
        f"{metrics.accuracy:.1%}",
        f"{100 * (metrics.accuracy - metrics.majority_accuracy):+.1f} pp vs baseline",
        help=f"{ci.level:.0%} interval {_interval(ci.accuracy, True)}",
    )
    c[0].caption(_interval(ci.accuracy, True))
    c[1].metric("F1 macro", f"{metrics.f1_macro:.3f}", help=f"{ci.level:.0%} interval {_interval(ci.f1_macro, False)}")
    c[1].caption(_interval(ci.f1_macro, False))
    c[2].metric(f"Majority baseline ({metrics.majority_class})", f"{metrics.majority_accuracy:.1%}")
    c[3].metric("Scored bars", f"{metrics.n:,}")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(plots.confusion_heatmap(metrics.confusion), width="stretch")
        download_table(metrics.confusion.reset_index(), "confusion_matrix", key="pred_confusion")
    with right:
        st.dataframe(
            metrics.per_class.style.format({"precision": "{:.1%}", "recall": "{:.1%}", "f1": "{:.3f}"}), width="stretch"
        )
        download_table(metrics.per_class.reset_index(), "metrics_per_class", key="pred_per_class")
    if metrics.by_position is not None:
        st.plotly_chart(plots.accuracy_by_position(metrics.by_position, metrics.majority_accuracy), width="stretch")
        st.caption(
            "Without a causal mask every position sees the bars after it: high accuracy early in the "
            "window is look-ahead, not skill. Only the last position is what a live trader gets."
        )
        download_table(metrics.by_position, "accuracy_by_position", key="pred_by_position")
    else:
        st.caption("Switch to **blocks** mode to see accuracy by position in the window.")


def show_equity(pred: Predictions, actions: np.ndarray, fee_bps: float) -> None:
    """The equity sanity check on the rows a live trader acts on (blocks mode: each window's last position)."""
    rows = decision_rows(pred)
    eq = equity_curve(pred.times[rows], pred.close[rows], actions[rows], pred.actions, fee_bps / 1e4)
    if eq is None:
        st.caption("Too few decisions with prices for an equity curve.")
        return
    held = (
        "each window's decision (its last position) is held until the next window's, "
        f"{pred.window} bars later; earlier positions of a block see later bars and are not traded"
        if pred.mode == "blocks"
        else "each bar's decision is held from its close to the next"
    )
    st.caption(
        f"Long on BUY, flat on HOLD, short on SELL; {held}. {eq.trades:,} position changes. "
        "No slippage, funding or execution delay."
    )
    st.plotly_chart(plots.equity_lines(eq.frame), width="stretch")
    st.dataframe(
        eq.stats.style.format({"total return": "{:+.1%}", "Sharpe (annualised)": "{:.2f}", "max drawdown": "{:.1%}"}),
        width="stretch",
    )
    download_table(eq.stats.reset_index(names="curve"), "equity_stats", key="pred_equity")


def label_rule(meta: dict, bar: pd.Timedelta | None) -> LabelRule:
    """Label horizon and threshold inputs, defaulting to the checkpoint's stored rule; the horizon is also shown
    in time at the data's bar interval `bar`."""
    stored, source = LabelRule.from_meta(meta)
    c = st.columns(2)
    horizon = int(
        c[0].number_input(
            "Label horizon (bars)",
            1,
            500,
            stored.horizon,
            key=keep("pred_horizon"),
            help=f"Default: the checkpoint's rule ({source}).",
        )
    )
    threshold = c[1].number_input(
        "Label threshold (%)",
        0.0,
        20.0,
        100 * stored.threshold,
        0.05,
        key=keep("pred_threshold"),
        help=f"Default: the checkpoint's rule ({source}).",
    )
    c[0].caption(f"{horizon_text(horizon, bar)} at this data's bars; default rule {source}.")
    return LabelRule(horizon, threshold / 100)


@st.cache_data(max_entries=2, show_spinner="Computing the feature matrix…")
def _raw_features(prep_key: tuple, feature_set: str, _frame: pd.DataFrame) -> pd.DataFrame:
    feats = compute_features(_frame, feature_set).reset_index(drop=True)
    feats.insert(0, "datetime", _frame["datetime"].to_numpy()[len(_frame) - len(feats) :])
    return feats


SHOWN_ROWS = 1_000  # rows drawn in the table; the downloads hold every row


def feature_matrix(prep_key: tuple, prepared: Prepared, fm: FeatureMatrix) -> None:
    """The computed features (as the training pipeline made them, or as the model gets them) to view and
    download with their timestamps, and what each simple-60 feature is (quirks included)."""
    # Lazy: drawn only while open (its table of 1,000 × 61 cells was most of what the page sent, and it is rarely
    # opened); opening it reruns the page, whose results are cached.
    with st.expander("Feature matrix: view and download", key="pred_fm_open", on_change="rerun") as box:
        if not box.open:
            return
        ohlcv = not prepared.feature_columns
        # The model input first: it is at hand, while the raw view computes the features once more (a second or
        # more on the demo market), which only someone who opens it should wait for.
        views = ("model input (normalised, padded)",) + ((f"{fm.feature_set} as computed (raw)",) if ohlcv else ())
        view = st.radio("Matrix", views, horizontal=True, key=keep("pred_fm_view"))
        if view != views[0]:
            table = _raw_features(prep_key, fm.feature_set, prepared.frame)
        else:
            table = pd.DataFrame(fm.values, columns=list(fm.names))
            table.insert(0, "datetime", fm.times)
        matrix, reference = st.tabs(["Matrix", "What each feature is"])
        with matrix:
            st.caption(
                f"{len(table):,} rows × {table.shape[1] - 1} features, one row per bar with a full "
                f"{WARMUP + 1}-bar window; the table shows the last {min(SHOWN_ROWS, len(table)):,} rows, the "
                "downloads hold all. Hover a column name for its definition and quirk."
            )
            help_of = {n: feature_help(i) for i, n in enumerate(SIMPLE60_NAMES)}
            config = {c: st.column_config.NumberColumn(help=help_of[c]) for c in table.columns if c in help_of}
            st.dataframe(table.tail(SHOWN_ROWS), column_config=config, hide_index=True, width="stretch")
            stem = "features_raw" if view != views[0] else "features_model_input"
            download_table(table, stem, key="pred_fm_dl", label="Feature matrix as")
        with reference:
            st.dataframe(simple60_reference(), hide_index=True, width="stretch")


def settings(ckpt: Checkpoint) -> tuple[str, int, str, str]:
    """Normalisation, window length (default: the checkpoint's), mode and precision."""
    cfg = ckpt.require_config()
    c = st.columns(4)
    norm = c[0].selectbox(
        "Normalisation",
        NORMALISATIONS,
        key=keep("pred_norm"),
        help="checkpoint: the training mean/std stored in the file; none: raw; data: z-scores of this data",
    )
    window = c[1].number_input(
        "Window length",
        1,
        cfg.max_length,
        help="default: the length the checkpoint's metadata names",
        key=bounded("pred_window", 1, cfg.max_length, default_window(ckpt.meta, cfg.max_length)),
    )
    mode = c[2].radio(
        "Mode",
        MODES,
        horizontal=True,
        key=keep("pred_mode"),
        help="rolling: stride 1, the last position "
        "decides (live trading); blocks: non-overlapping windows, every position scored (the 61 % "
        "evaluation), the newest partial block by the last window",
    )
    precision = c[3].radio("Precision", ("fast", "exact"), horizontal=True, key=keep("pred_precision"))

    return norm, int(window), mode, precision


def show_signals(pred: Predictions, offsets: np.ndarray, has_prices: bool) -> np.ndarray:
    """Collapse alarms, price chart with signals, probability timeline, class shares, confidence and logits;
    returns the actions after `offsets`."""
    probs, actions = decide(pred.logits, offsets)
    shares = class_shares(actions, pred.actions)
    for alarm in (collapse_alarm(shares), undecided_note(actions)):
        if alarm:
            st.error(alarm)
    if has_prices:
        st.plotly_chart(plots.price_signals(pred.times, pred.close, actions, pred.actions), width="stretch")
    st.plotly_chart(plots.probability_timeline(pred.times, probs, pred.actions), width="stretch")
    c = st.columns(3)
    c[0].plotly_chart(plots.class_share_bars(shares, COLLAPSE_SHARE), width="stretch")
    c[1].plotly_chart(plots.confidence_histogram(probs, actions, pred.actions), width="stretch")
    c[2].plotly_chart(plots.logit_distributions(pred.logits, pred.actions), width="stretch")
    return actions
