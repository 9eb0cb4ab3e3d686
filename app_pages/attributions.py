"""Attributions: which features and which moments drove a SELL / HOLD / BUY (Captum methods)."""
import numpy as np
import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import attribution as attr
from flag_model.ui import attributions as aw
from flag_model.ui.faithfulness import faithfulness_panel

st.title("Attributions")
ckpt, model = ui.require_model()
cfg = ui.loaded().config
model_key = (ckpt.digest, cfg.num_heads, cfg.lora_scale, cfg.norm_first, cfg.causal)
name, fm, data_key = ui.market_features(ckpt, cfg.state_dim)
for w in fm.warnings:
    st.warning(ui.md_escape(w))
means, means_note = attr.feature_means(fm, ckpt.meta)
actions = attr.action_names(cfg.n_actions)
n = len(fm.values)


c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
length = ui.int_slider(c1, "Window length", 1, min(cfg.max_length, n), ui.default_window(ckpt, cfg.max_length))
start = c2.slider("Window (first row)", 0, n - length, n - length) if n > length else 0
choice = c3.selectbox("Explain class", ("predicted", *actions), key="attr_class")
offset = c4.number_input("Deciding step (0 = last bar)", -(length - 1), 0, 0)
m1, m2, m3, m4 = st.columns(4)
method = m1.selectbox("Method", attr.METHODS, key="attr_method")
baseline = m2.selectbox("Baseline", attr.BASELINES, disabled=method not in attr.BASELINE_METHODS, key="attr_baseline")
steps = m3.number_input("Steps (IG) / samples (GradientSHAP)", 1, 2048, 50,
                        disabled=method not in attr.PATH_METHODS, key="attr_steps")
batch = m4.number_input("Internal batch (rows per pass)", 1, 1024, 64)
with st.expander("More options"):
    o1, o2, o3, o4 = st.columns(4)
    output = o1.radio("Explain the", attr.OUTPUTS, horizontal=True, help="Logits are additive: IG's completeness "
                      "f(x) − f(baseline) = Σ attributions holds in logit units.")
    auto = o2.toggle("Auto steps (IG)", True, help="Double the steps until the relative delta is below the threshold.")
    threshold = o2.number_input("Threshold (relative delta)", 0.001, 1.0, 0.05, format="%.3f")
    max_steps = o3.number_input("Step cap", 1, 4096, 800)
    patch = (o3.number_input("Occlusion patch: steps", 1, length, min(8, length)),
             o4.number_input("Occlusion patch: features", 1, cfg.state_dim, 1))
    top_k = ui.int_slider(o4, "Top features shown", min(5, cfg.state_dim), cfg.state_dim, 20)
st.caption(f"{ui.md_escape(name)}: bars {fm.times[start]} → {fm.times[start + length - 1]} · features {fm.feature_set}, "
           f"normalisation {fm.normalisation} · baseline *{baseline}*: "
           f"{means_note if baseline == attr.MEANS else attr.BASELINE_NOTES[baseline]}")

opts = dict(target=None if choice == "predicted" else actions.index(choice), position=length - 1 + int(offset),
            baseline=baseline, steps=int(steps), internal_batch_size=int(batch), output=output,
            occlusion_patch=(int(patch[0]), int(patch[1])),
            auto_threshold=float(threshold) if auto else None, max_steps=int(max_steps))
args = (model, fm.values, means, fm.names)
try:
    res = aw.attribute(model_key, data_key, start, length, method, tuple(opts.items()), *args)
except ValueError as exc:
    st.error(f"Cannot attribute this window: {ui.md_escape(exc)}")
    st.stop()

left, right = st.columns([1, 2])
left.plotly_chart(plots.class_probabilities(res.probabilities, actions, res.target_name))
with right:
    k1, k2, k3, k4 = st.columns(4)
    k1.metric(f"f(x): {res.output} of {res.target_name}", f"{res.f_input:.3f}")
    k2.metric("f(baseline)", f"{res.f_baseline:.3f}")
    k3.metric("Σ attributions", f"{res.attributions.sum():.3f}")
    k4.metric(f"time ({res.steps} steps)" if res.steps else "time", f"{res.seconds:.2f} s")
    level, message = attr.completeness(res, float(threshold))
    {"good": st.success, "fair": st.warning, "poor": st.error, "n/a": st.info}[level](message)
    for note in res.notes:
        st.caption(note)

offsets = np.arange(length) - res.position
st.plotly_chart(plots.attribution_heatmap(
    res.attributions, res.feature_names, offsets, f"{method}: attribution to {res.target_name} ({res.output})"))
f1, f2 = st.columns(2)
top = attr.feature_table(res, top_k)
f1.plotly_chart(plots.signed_bars(list(top["feature"]), top["total"], f"Top {len(top)} features (sum over time)",
                                  "attribution"))
f2.plotly_chart(plots.signed_bars(list(offsets), res.per_time, "Per time step (sum over features)", "attribution",
                                  horizontal=False))

st.subheader("Agreement between methods")
chosen = st.multiselect("Methods to compare on this window", attr.METHODS,
                        [attr.IG, attr.SALIENCY, attr.IXG, attr.DEEPLIFT, attr.ABLATION])
if st.toggle("Compare", key="attr_compare") and chosen:
    results = [aw.attribute(model_key, data_key, start, length, m, tuple(opts.items()), *args) for m in chosen]
    a1, a2 = st.columns(2)
    a1.plotly_chart(plots.agreement_heatmap(attr.agreement(results), "Spearman ρ of |per-feature totals|"))
    rollout = {"Attention rollout": attr.rollout_importance(model, fm.values[start:start + length], res.position)}
    a2.plotly_chart(plots.agreement_heatmap(attr.agreement(results, "time", rollout),
                                            "Spearman ρ of |per-step totals|"))
    st.caption("Attention rollout ranks time steps only (how much each step flows into the deciding one); "
               "Feature Ablation has no per-step ranking (its effects are spread evenly over time).")

st.subheader("Global importance over many windows")
g1, g2 = st.columns(2)
count = g1.slider("Windows (spread evenly over the data)", 10, 1000, 200, step=10, key="attr_count")
g_method = g2.selectbox("Method", attr.METHODS, index=attr.METHODS.index(attr.IXG), key="attr_global_method",
                        help="Input × Gradient and Saliency cost one pass per batch; IG costs `steps` passes.")
g_opts = {k: opts[k] for k in ("target", "position", "baseline", "steps", "internal_batch_size", "output",
                               "occlusion_patch")}
if st.button("Compute global importance", type="primary", key="attr_global") or st.session_state.get("_attr_global"):
    st.session_state["_attr_global"] = True
    gi = aw.global_importance(model_key, data_key, length, count, g_method, tuple(g_opts.items()), *args)
    table = gi.table()
    counts = ", ".join(f"{a} {c}" for a, c in gi.class_counts().items())
    st.caption(f"{len(gi.totals)} windows in {gi.seconds:.1f} s, each explained for "
               f"{'its predicted class' if opts['target'] is None else actions[opts['target']]}; predicted: {counts}. "
               "Bars: mean |attribution summed over time|; red/blue: the mean is for/against the explained class.")
    b1, b2 = st.columns(2)
    b1.plotly_chart(plots.global_importance_bars(table, top_k))
    b2.plotly_chart(plots.class_breakdown_bars(table, actions, min(top_k, 12)))
    ui.download_table(table, "global_importance", key="global_importance")
faithfulness_panel(model, model_key, data_key, fm.values, start, length, opts, means)
