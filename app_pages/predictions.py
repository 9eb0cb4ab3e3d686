"""Predictions: SELL/HOLD/BUY on uploaded (or demo) market data through the fast inference engine."""

import streamlit as st

from flag_model import ui
from flag_model.analysis.predict import attach_labels, predictions_frame, scorable_rows
from flag_model.data import check_window
from flag_model.features import WARMUP
from flag_model.ui import predictions as pw
from flag_model.ui.session import MarketData, bounded, set_market

st.title("Predictions")
ckpt, model = ui.require_model()
cfg = model.config  # with the sidebar's assumptions
assumptions = cfg.assumption_key

source = pw.data_source()
if source is None:
    set_market(None)
    name, data_key, raw = "demo market (synthetic)", f"demo-{ui.demo_size()}", ui.demo_market(ui.demo_size())
    st.info(
        "No file given: showing the **demo market**. Upload OHLCV bars (any common column names, a date or "
        "epoch-ms column) or precomputed feature columns."
    )
else:
    name, data_key, raw, origin = source
kind, mapping, columns, close_col, repair = pw.mapping_widgets(raw, cfg.state_dim, data_key)
prep_key = (data_key, kind, mapping, tuple(columns), close_col, repair)  # what the prepared data depends on
prep = pw.prepare(*prep_key, cfg.state_dim, raw)
pw.show_issues(prep.issues)
if not prep.ok:
    st.stop()
frame = prep.valid_frame()
if source is not None and kind == pw.KINDS[0]:
    set_market(MarketData(name, frame, origin))  # the Attention, Attributions and LoRA pages use it too
st.caption(
    f"**{ui.md_escape(name)}**: {len(frame):,} rows from {frame['datetime'].iloc[0]} to "
    f"{frame['datetime'].iloc[-1]} (times read as {prep.time_format}). Row numbers in messages count "
    "the file's data lines from 1; everywhere else bars are named by their time."
)
bars = ui.interval_notice(frame["datetime"], ckpt.meta).data  # bar interval against training, gaps

norm, window, mode, precision = pw.settings(ckpt)

fm = pw.features(ckpt.digest, prep_key, norm, cfg.state_dim, prep, dict(ckpt.meta))
pw.feature_matrix(prep_key, prep, fm)
for w in fm.warnings:
    st.warning(ui.md_escape(w))
pw.show_drift(fm, dict(ckpt.meta))
issue = check_window(len(fm.values), window, cfg.max_length, WARMUP if kind == pw.KINDS[0] else 0)
if issue is not None:
    st.error(ui.md_escape(issue.message))
    st.stop()

scorable = scorable_rows(len(fm.values), window, mode)
eng = pw.engine(ckpt.digest, assumptions, precision, model)
quick = pw.quick_bars(ckpt.digest, assumptions, precision, window, mode, eng, scorable)
last = pw.bars_to_score(data_key, scorable, quick)
st.caption(
    f"Engine: {eng.info.dtype} on {eng.info.device} — {eng.info.reason}; {eng.info.kernels}; "
    f"{eng.batch_size(window)} windows per batch, {eng.info.threads} torch thread(s)."
)
pred = pw.predictions(ckpt.digest, assumptions, precision, prep_key, norm, window, mode, last, eng, fm)
if fm.has_prices:
    rule = pw.label_rule(ckpt.meta, bars.median)
    pred = attach_labels(pred, fm.close, rule)

st.subheader("Signals")
offsets = pw.offsets(pred.actions)
actions = pw.show_signals(pred, offsets, fm.has_prices)

if fm.has_prices:
    pw.show_metrics(pred, actions, rule, bars.median)
    st.subheader("Equity curve — a sanity check, not a backtester")
    fee_bps = st.number_input(
        "Fee per unit of position change (basis points)", 0.0, 100.0, step=0.5, key=bounded("pred_fee", 0.0, 100.0, 5.0)
    )
    pw.show_equity(pred, actions, fee_bps)

st.subheader("Download")
frame = predictions_frame(pred, offsets)
stem = f"predictions_{mode}_w{window}"
ui.download_table(frame, stem, key="pred_dl", label="Predictions as")
st.caption(f"{len(frame):,} rows: time, raw logits, probabilities and action after the offsets above, and the label.")
