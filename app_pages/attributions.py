"""Attributions: which features and which moments drove a SELL / HOLD / BUY (Captum methods)."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import attribution as attr
from flag_model.features import action_names
from flag_model.ui import attributions as aw
from flag_model.ui.faithfulness import faithfulness_panel
from flag_model.ui.session import bounded, keep, window_by_time

st.title("Attributions")
ckpt, model = ui.require_model()
cfg = model.config  # with the sidebar's assumptions
model_key = (ckpt.digest, *cfg.assumption_key)
name, fm, data_key = ui.market_features(ckpt, cfg.state_dim)
means, means_note = attr.feature_means(fm, ckpt.meta)
actions = action_names(cfg.n_actions)
n = len(fm.values)


c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
length = ui.window_length(c1, ckpt.meta, cfg.max_length, n, "attr_length")
start = window_by_time(fm.times, length, "attr_when", container=c2)
choice = c3.selectbox("Explain class", ("predicted", *actions), key=keep("attr_class"))
offset = c4.number_input(
    "Deciding step (0 = last bar)", -(length - 1), 0, key=bounded("attr_offset", -(length - 1), 0, 0)
)
m1, m2, m3, m4 = st.columns(4)
method = m1.selectbox("Method", attr.METHODS, key=keep("attr_method"))
baseline = m2.selectbox(
    "Baseline", attr.BASELINES, disabled=method not in attr.BASELINE_METHODS, key=keep("attr_baseline")
)
steps = m3.number_input(
    "Steps (IG) / samples (GradientSHAP)",
    1,
    2048,
    disabled=method not in attr.PATH_METHODS,
    key=bounded("attr_steps", 1, 2048, 50),
)
batch = m4.number_input("Internal batch (rows per pass)", 1, 1024, key=bounded("attr_batch", 1, 1024, 64))
more = aw.more_options(length, cfg.state_dim)
st.caption(
    f"{ui.md_escape(name)}: bars {fm.times[start]} → {fm.times[start + length - 1]} · features {fm.feature_set}, "
    f"normalisation {fm.normalisation} · baseline *{baseline}*: "
    f"{means_note if baseline == attr.MEANS else attr.BASELINE_NOTES[baseline]}"
)

opts = dict(
    target=None if choice == "predicted" else actions.index(choice),
    position=attr.position_of_offset(length, offset),
    baseline=baseline,
    steps=int(steps),
    internal_batch_size=int(batch),
    output=more.output,
    occlusion_patch=more.patch,
    auto_threshold=more.threshold if more.auto else None,
    max_steps=more.max_steps,
)
args = (model, fm.values, means, fm.names)
try:
    res = aw.attribute(model_key, data_key, start, length, method, tuple(opts.items()), *args)
except ValueError as exc:
    st.error(f"Cannot attribute this window: {ui.md_escape(exc)}")
    st.stop()

aw.show_result(res, actions, more.threshold)

offsets = res.offsets
st.plotly_chart(
    plots.attribution_heatmap(
        res.attributions, res.feature_names, offsets, f"{method}: attribution to {res.target_name} ({res.output})"
    )
)
ui.download_table(
    attr.attribution_matrix(res, fm.times[start : start + length]),
    f"attributions_{method}",
    key="attr_matrix",
    label="Time × feature attributions as",
)
f1, f2 = st.columns(2)
top = attr.feature_table(res, more.top_k)
f1.plotly_chart(
    plots.signed_bars(list(top["feature"]), top["total"], f"Top {len(top)} features (sum over time)", "attribution")
)
f2.plotly_chart(
    plots.signed_bars(list(offsets), res.per_time, "Per time step (sum over features)", "attribution", horizontal=False)
)

st.subheader("Agreement between methods")
chosen = st.multiselect(
    "Methods to compare on this window",
    attr.METHODS,
    key=keep("attr_compare_methods"),
    default=None
    if "attr_compare_methods" in st.session_state
    else [attr.IG, attr.SALIENCY, attr.IXG, attr.DEEPLIFT, attr.ABLATION],
)
if st.toggle("Compare", key=keep("attr_compare")) and chosen:
    results = [aw.attribute(model_key, data_key, start, length, m, tuple(opts.items()), *args) for m in chosen]
    a1, a2 = st.columns(2)
    a1.plotly_chart(plots.agreement_heatmap(attr.agreement(results), "Spearman ρ of |per-feature totals|"))
    rollout = {"Attention rollout": attr.rollout_importance(model, fm.values[start : start + length], res.position)}
    a2.plotly_chart(
        plots.agreement_heatmap(attr.agreement(results, "time", rollout), "Spearman ρ of |per-step totals|")
    )
    st.caption(
        "Attention rollout ranks time steps only (how much each step flows into the deciding one); "
        "Feature Ablation has no per-step ranking (its effects are spread evenly over time)."
    )

aw.global_panel(model_key, data_key, length, opts, args, actions, more.top_k)
faithfulness_panel(model, model_key, data_key, fm.values, start, length, opts, means)
