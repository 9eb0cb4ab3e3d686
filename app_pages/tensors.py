"""Tensor tree: every tensor in its module hierarchy, a searchable table, one tensor in detail, a diff."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis import tensors
from flag_model.ui.session import keep

STAT_LABELS = {
    "std": "std",
    "mean": "mean",
    "abs_max": "max |value|",
    "fro_norm": "Frobenius norm",
    "zeros_share": "share of zeros",
    "min": "min",
    "max": "max",
    "nonfinite": "NaN/Inf count",
}

st.title("Tensor tree")
ckpt = ui.require_checkpoint()


@st.cache_data(max_entries=8, show_spinner="Computing statistics of every tensor…")
def _stats(digest: str, _sd):
    return tensors.tensor_stats(_sd)


@st.cache_data(max_entries=32, show_spinner="Histogram, heatmap and singular values…")
def _detail(digest: str, name: str, _t):
    return tensors.tensor_detail(name, _t)


@st.cache_data(max_entries=8, show_spinner="Comparing the two checkpoints…")
def _diff(digest_a: str, digest_b: str, _a, _b):
    return tensors.state_dict_diff(_a, _b)


stats = _stats(ckpt.digest, ckpt.state_dict)
for col, (label, count) in zip(st.columns(4), tensors.stats_totals(stats).items()):
    col.metric(label, f"{count:,}")

stat = st.selectbox("Colour by", list(STAT_LABELS), format_func=STAT_LABELS.__getitem__, key=keep("tensors_color"))
st.plotly_chart(plots.tensor_treemap(tensors.tensor_tree(stats, stat), STAT_LABELS[stat]), width="stretch")
st.caption(
    "Area = number of elements. Click a box to zoom into it; the bar at the top goes back. "
    "Inner boxes show the element-weighted mean (min / max / sum for those statistics)."
)

st.subheader("Table")
f1, f2 = st.columns([2, 1])
query = f1.text_input("Search names", key=keep("tensors_query"), placeholder="e.g. ffn.3 or lora_B")
roles = f2.multiselect(
    "Roles", tensors.ROLES, default=sorted(set(stats["role"]), key=tensors.ROLES.index), key=keep("tensors_roles")
)
shown = stats[stats["role"].isin(roles) & stats["name"].str.contains(query.strip(), regex=False)]
st.dataframe(
    shown,
    hide_index=True,
    width="stretch",
    height=320,
    column_config={
        "bytes": st.column_config.NumberColumn(format="%d"),
        "zeros_share": st.column_config.NumberColumn(format="percent"),
    },
)
ui.download_table(shown, f"{ckpt.digest[:12]}-tensors", key="tensors_table")

st.subheader("One tensor")
pick = shown if len(shown) else stats
names = list(pick["name"])
first_base = next((i for i, (r, s) in enumerate(zip(pick["role"], pick["shape"])) if r == "base" and "×" in s), 0)
name = st.selectbox("Tensor", names, index=first_base, key=keep("tensors_pick"))
detail = _detail(ckpt.digest, name, ckpt.state_dict[name])
spec = detail.spectrum
if spec is not None:
    (st.info if spec.looks_like_init else st.success)(f"**{ui.md_escape(name)}**: {ui.md_escape(spec.verdict)}")
# Lazy tabs: the heatmap is drawn when its tab is opened (it was the page's largest figure on every visit).
values_tab, heatmap_tab = st.tabs(["Values and singular values", "Heatmap"], key=keep("tensors_tab"), on_change="rerun")
if values_tab.open:
    left, right = values_tab.columns(2)
    left.plotly_chart(plots.value_histogram(detail.hist_edges, detail.hist_counts, name), width="stretch")
    if spec is not None:
        right.plotly_chart(
            plots.spectrum_vs_init(spec.singular_values, spec.expected, spec.edge, spec.init), width="stretch"
        )
if heatmap_tab.open and detail.matrix is not None:
    heatmap_tab.plotly_chart(
        plots.matrix_heatmap(detail.matrix, name, detail.matrix_step, detail.shape), width="stretch"
    )
elif heatmap_tab.open:
    heatmap_tab.caption(f"{ui.md_escape(name)} is not a matrix: no heatmap.")

st.subheader("Compare with a second checkpoint")
other = ui.second_checkpoint(
    "tensors",
    "Open a second file to see the per-tensor relative change ‖b − a‖ / ‖a‖ and added, removed or reshaped keys.",
)
diff = _diff(ckpt.digest, other.digest, ckpt.state_dict, other.state_dict)
counts = diff["status"].value_counts()
for col, status in zip(st.columns(5), ("same", "changed", "reshaped", "added", "removed")):
    col.metric(status.capitalize(), int(counts.get(status, 0)))
grid = tensors.diff_grid(diff)
if not grid.empty and grid.notna().any().any():
    st.plotly_chart(plots.change_heatmap(grid), width="stretch")
    st.caption(
        "Relative change ‖b − a‖ / ‖a‖ per tensor (log colour); grey = unchanged, red ∞ = changed from all "
        "zeros (infinite relative change), blank = not in both files."
    )
odd = diff[diff["status"].isin(["added", "removed", "reshaped"])]
if len(odd):
    st.warning(
        f"Keys added (only in **{ui.md_escape(other.source)}**), removed (only in this file) or reshaped: {len(odd)}."
    )
    ui.table(odd[["name", "status", "shape_a", "shape_b"]], "keys_added_removed", "tensors_odd")
with st.expander("Every key"):
    ui.table(diff, "tensor_diff", "tensors_diff")
