"""Architecture check: which family this file is, why it does (not) fit a target, one-click fixes, export."""

from pathlib import Path

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
FIXED = "arch_applied"  # session key: (digest, target key, fix ids, drop) of the fixes applied with the button

st.title("Architecture check")
ckpt, ld = ui.require_checkpoint(), ui.loaded()
sd = ckpt.state_dict


@st.cache_data(max_entries=16, show_spinner="Searching for fixes…")
def _fixes(digest: str, target_key: str, scale: float, _sd, _target):
    return layouts.suggest_fixes(_sd, _target, lora_scale=scale)


rec = ui_layouts.recognition(ckpt)
ui_layouts.family_panel(rec)
with st.expander("How the file matches each known family"):
    st.plotly_chart(plots.layout_ranking_bars(rec.table()), width="stretch")

choice = st.selectbox("Target", list(TARGETS), format_func=TARGETS.get, key=ui.keep("arch_target"))
if choice == "second":
    other = ui.second_checkpoint("arch", "Open the checkpoint to compare against.")
    target, how, target_key = layouts.shapes_of(other.state_dict), f"the keys of {other.source}", other.digest
else:
    try:
        size = layouts.infer_sizes(sd, rec)
    except layouts.LayoutError as exc:
        st.error(ui.md_escape(exc))
        st.stop()
    with st.expander("Target sizes — e.g. what another loader assumed"):
        s = st.columns(3)
        d = s[0].number_input("hidden size d", 1, value=size.d_model, key=ui.keep(f"arch_d_{ckpt.digest[:12]}"))
        f = s[1].number_input("FFN width F", 1, value=max(size.ffn_dim, 1), key=ui.keep(f"arch_f_{ckpt.digest[:12]}"))
        n = s[2].number_input("blocks", 1, value=max(size.n_blocks, 1), key=ui.keep(f"arch_n_{ckpt.digest[:12]}"))
    sizes = {
        k: v
        for k, v, was in (
            ("d_model", d, size.d_model),
            ("ffn_dim", f, max(size.ffn_dim, 1)),
            ("n_blocks", n, max(size.n_blocks, 1)),
        )
        if v != was
    }
    target, how = layouts.target_shapes(choice, sd, ld.config, rec, **sizes)
    target_key = f"{choice}-{d}-{f}-{n}-{hash(ld.config)}"
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
with st.expander("Every key, aligned"):
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
fixes = _fixes(ckpt.digest, target_key, scale, sd, target) if not diff.ok else []
applied = st.session_state.get(FIXED)
if fixes:
    st.subheader("Fix")
    by_id = {fx.id: fx for fx in fixes}
    chosen = st.multiselect(
        "Fixes to apply, in order",
        list(by_id),
        default=list(by_id),
        format_func=lambda i: by_id[i].title,
        key=ui.keep(f"arch_fixes_{target_key}"),
    )
    st.markdown(
        "\n".join(f"{i}. **{by_id[x].title}** — {ui.md_escape(by_id[x].detail)}" for i, x in enumerate(chosen, 1))
    )
    drop = st.checkbox("Also drop the keys the target has no place for", key=ui.keep(f"arch_drop_{target_key}"))
    if st.button("Apply fixes", type="primary", key="arch_apply"):
        applied = st.session_state[FIXED] = (ckpt.digest, target_key, tuple(chosen), drop)
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

st.subheader("Export")
e1, e2 = st.columns(2)
kind = e1.radio(
    "Layout",
    layouts.EXPORT_KINDS,
    horizontal=True,
    key=ui.keep("arch_export_kind"),
    help="native: FLAG-TRADER keys with LoRA · merged: W + scale·(A@B)ᵀ under the native names, no lora "
    "keys · stock: nn.TransformerEncoderLayer names (encoder.layers.N.self_attn.in_proj_weight …)",
)
fmt = e2.radio("Format", layouts.EXPORT_FORMATS, horizontal=True, key=ui.keep("arch_export_fmt"))
problem = layouts.export_problem(source, kind)
if problem:
    st.error(f"Cannot export as {kind}: {ui.md_escape(problem)}")
    st.stop()
if kind != "native":
    st.caption(f"LoRA is merged with scale {scale:g} — the LoRA-scale assumption from the sidebar.")
src, stem = source, Path(ckpt.source).stem  # the download callable runs later, on another thread: bind this run's dict
st.download_button(
    f"Download {kind} .{fmt}",
    lambda: layouts.export_file(src, kind, fmt, ckpt.stored_config, **assumptions),
    file_name=f"{stem}-{kind}.{fmt}",
    key="arch_download",
    on_click="ignore",
)
if kind == "stock":
    ui_layouts.stock_panel(f"{ckpt.digest}-{applied}", source, ckpt.stored_config, assumptions, stem)
