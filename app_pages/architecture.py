"""Architecture check: which family this file is, why it does (not) fit a target, one-click fixes, export."""

import streamlit as st

from flag_model import layouts, plots, ui
from flag_model.analysis.tensors import key_status_tree
from flag_model.ui import layouts as ui_layouts

STYLE = {s: f"background-color: {c}33" for s, c in plots.STATUS_COLORS.items()}
TARGETS = {
    "reconstruction": "Reconstruction (current assumptions)",
    **{n: fam.title for n, fam in layouts.FAMILIES.items()},
    "second": "A second checkpoint",
}

st.title("Architecture check")
ckpt, ld = ui.require_checkpoint(), ui.loaded()
sd = ckpt.state_dict


rec = ui_layouts.recognition(ckpt)
ui_layouts.family_panel(rec)
# Lazy expanders (here and below): their chart and table are drawn only while open.
with st.expander("How the file matches each known family", key="arch_rank_open", on_change="rerun") as box:
    if box.open:
        st.plotly_chart(plots.layout_ranking_bars(rec.table()), width="stretch")

choice = st.selectbox("Target", list(TARGETS), format_func=TARGETS.__getitem__, key=ui.keep("arch_target"))
if choice == "second":
    other = ui.second_checkpoint("arch", "Open the checkpoint to compare against.")
    target, how, target_key = layouts.shapes_of(other.state_dict), f"the keys of {other.source}", other.digest
else:
    try:
        size = layouts.infer_sizes(sd, rec)
    except layouts.LayoutError as exc:
        st.error(ui.md_escape(exc))
        st.stop()
    sizes, sizes_key = ui_layouts.target_sizes(size, ckpt.digest)
    target, how = layouts.target_shapes(choice, sd, ld.config, rec, **sizes)
    target_key = f"{choice}-{sizes_key}-{hash(ld.config)}"
st.caption(f"Target: {ui.md_escape(how)}.")
diff = layouts.diff_keys(sd, target)
for col, (label, n_keys) in zip(st.columns(4), diff.counts().items()):
    col.metric(label.capitalize(), n_keys)
(st.success if diff.ok else st.error)(
    f"{ui.md_escape(diff.summary())}." + (" The file loads strictly into this target." if diff.ok else "")
)
table = layouts.diff_table(sd, target)
st.plotly_chart(plots.key_status_treemap(key_status_tree(table)), width="stretch")
st.caption(
    "One tree over the keys of both sides: green matched, red mis-shaped, orange missing (target only), purple "
    "unexpected (file only), yellow mixed. Click a box to zoom."
)
bad = table[table["status"] != "matched"]
if len(bad):
    ui.table(
        bad.style.apply(lambda r: [STYLE[r["status"]]] * len(r), axis=1),
        "key_differences",
        "arch_bad",
        height=min(400, 38 + 35 * len(bad)),
    )
with st.expander("Every key, aligned", key="arch_keys_open", on_change="rerun") as box:
    if box.open:
        ui.table(table, "keys_aligned", "arch_keys")

notes = layouts.explain(sd, target, rec)
if notes:
    st.subheader("Why")
    st.markdown("\n".join(f"- **{e.rule.replace('_', ' ')}** — {ui.md_escape(e.message)}" for e in notes))

assumptions = {
    **{k: getattr(ld.config, k) for k in ("num_heads", "lora_scale", "norm_first", "causal") if ld.config},
    **layouts.family_assumptions(sd, rec)[0],
}  # the sketch's own code: pre-norm, scale 1
scale = assumptions.get("lora_scale", 1.0)
foreign = rec.best.score >= layouts.recognize.CLOSE and not rec.best.family.convertible and choice != "second"
if foreign and not diff.ok:
    st.info(
        f"No fixes are offered: this is a {rec.best.family.title} file, a different model (renaming would only line "
        f"up the stems they share). Converts to: {rec.best.family.converts_to}."
    )
    st.stop()
applied = (
    ui_layouts.fix_panel(ckpt, target, target_key, scale) if not diff.ok else st.session_state.get(ui_layouts.APPLIED)
)
source = sd
if applied and applied[:2] == (ckpt.digest, target_key):
    try:
        source = layouts.fix_for_target(sd, applied[2], target, drop_extra=applied[3])
    except layouts.LayoutError as exc:
        st.error(f"The fixes could not be applied: {ui.md_escape(exc)}")
        st.stop()
    st.info(
        f"After the fixes ({len(applied[2])} applied{', extra keys dropped' if applied[3] else ''}): "
        f"{ui.md_escape(layouts.diff_keys(source, target).summary())}."
    )
    res = layouts.strict_load(source, ckpt.stored_config, **assumptions)
    (st.success if res.ok else st.error)(f"Strict load into the reconstruction after the fixes: {res.message}")
    if res.ok:
        ui_layouts.use_fixed(ckpt, source, ckpt.stored_config, assumptions)

ui_layouts.export_panel(ckpt, source, scale, assumptions, applied)
