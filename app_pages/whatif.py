"""What-if: edit a window and watch the decision; the smallest edit that flips it; how stable the decision is."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import whatif as wi
from flag_model.analysis.attribution import feature_means
from flag_model.data import spread_starts
from flag_model.features import action_names
from flag_model.ui import whatif as uw
from flag_model.ui.session import keep, window_by_time

st.title("What-if")
ckpt, model = ui.require_model()
cfg = model.config  # with the sidebar's assumptions
model_key = (ckpt.digest, *cfg.assumption_key)
name, fm, data_key = ui.market_features(ckpt, cfg.state_dim)
means, means_note = feature_means(fm, ckpt.meta)
actions = action_names(cfg.n_actions)


c1, c2 = st.columns([1, 2])
with c1:
    length = ui.window_length(st, ckpt.meta, cfg.max_length, len(fm.values), "wi_len")
    start = window_by_time(fm.times, length, "wi_when")
c2.caption(
    f"{name}: bars {fm.times[start]} → {fm.times[start + length - 1]} ({length} steps) · features "
    f"{fm.feature_set}, normalisation {fm.normalisation}. Edits are in the model's input units: after the "
    f"checkpoint's normalisation 0 is the training mean and 1 is one training σ. Training mean: {means_note}."
)

edit_tab, flip_tab, stable_tab = st.tabs(["Edit the window", "Smallest flip", "Stability under noise"])
with edit_tab:
    edit, source = uw.edit_controls(fm, length, "wi_edit")
    try:
        res = uw.edit_result(
            model_key, data_key, start, length, tuple(vars(edit).values()), source, model, fm.values, means
        )
    except ValueError as exc:
        st.error(f"Cannot apply this edit: {ui.md_escape(exc)}")
    else:
        uw.show_edit(res)

with flip_tab:
    f1, f2, f3 = st.columns(3)
    target = f1.selectbox(
        "Flip the decision to",
        actions,
        uw.runner_up(model_key, data_key, start, length, model, fm.values),
        key=keep("wi_target"),
        help="Defaults to the runner-up class of the first window shown.",
    )
    iterations = f2.number_input("Gradient steps", 10, 3000, 300, step=50, key=keep("wi_iter"))
    rival = f3.toggle("Compare with random directions (same budget)", True, key=keep("wi_rival"))
    feats, steps = uw.cells_controls(fm.names, length, "wi_flip", all_features=True)
    settings = (model_key, data_key, start, length, actions.index(target), feats, steps, int(iterations), rival)
    if uw.requested(st.button("Find the smallest flip", type="primary", key="wi_search"), "_wi_flip", settings):
        try:
            flip, other = uw.flip_search(*settings, model, fm.values, fm.names)
        except ValueError as exc:
            st.info(ui.md_escape(exc))
        else:
            uw.show_flip(flip, other, "wi_flip")

with stable_tab:
    s1, s2, s3 = st.columns([2, 2, 1])
    samples = s1.slider("Noisy copies per noise level", 4, 256, 16, step=4, key=keep("wi_samples"))
    count = s2.slider("Windows for the curve over the data", 10, 500, 30, step=10, key=keep("wi_count"))
    many = s3.toggle("Over many windows", False, key=keep("wi_many"))
    stable_settings = (model_key, data_key, start, length, samples, many and count)
    if uw.requested(st.button("Measure stability", type="primary", key="wi_stable"), "_wi_stable", stable_settings):
        sigma = wi.feature_sigma(fm.values)
        curves = {
            "this window": uw.stability_curve(model_key, data_key, length, (start,), samples, model, fm.values, sigma)
        }
        if many:
            starts = tuple(int(i) for i in spread_starts(len(fm.values), length, count))
            curves[f"{len(starts)} windows (mean)"] = uw.stability_curve(
                model_key, data_key, length, starts, samples, model, fm.values, sigma
            )
        st.plotly_chart(plots.stability_lines(curves))
        st.caption(
            "σ is each input's standard deviation over the loaded data (in the model's units); padded zero "
            "columns get no noise. A share near 100 % at k = 0.1 means the decision survives noise of a "
            "tenth of a feature's usual spread."
        )
        st.dataframe(curves[list(curves)[-1]], hide_index=True)
