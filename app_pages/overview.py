"""Overview: what the open checkpoint is, how its configuration was inferred, and whether it is healthy."""

import streamlit as st

from flag_model import plots, ui
from flag_model.analysis.health import dtype_counts, findings_frame, health_scan, parameter_counts
from flag_model.analysis.summary import assumptions_line, config_table, file_table, foreign_table, metadata_table
from flag_model.ui import layouts as ui_layouts

ICONS = {
    "error": ":red[:material/error:]",
    "warning": ":orange[:material/warning:]",
    "info": ":blue[:material/info:]",
    "ok": ":green[:material/check_circle:]",
}

st.title("Overview")
ckpt = ui.require_checkpoint()
ld = ui.loaded()


@st.cache_data(max_entries=8, show_spinner="Scanning tensors…")
def _scan(digest: str, _sd) -> tuple:
    return parameter_counts(_sd), dtype_counts(_sd), findings_frame(health_scan(_sd))


counts, dtypes, findings = _scan(ckpt.digest, ckpt.state_dict)

if ld.model is not None:
    st.success(
        f"**{ui.md_escape(ckpt.source)}** — {ckpt.n_tensors}/{ckpt.n_tensors} tensors loaded strictly into the "
        f"reconstruction with {assumptions_line(ckpt.require_config(), ld.model.config)}."
    )
else:
    st.error(
        f"**{ui.md_escape(ckpt.source)}** does not load into the reconstruction. "
        f"Open **Architecture check** to see why and fix it.\n\n{ui.md_escape(ld.error)}"
    )

st.subheader("Layout family")
ui_layouts.family_panel(ui_layouts.recognition(ckpt))
if ckpt.read_mode == "restricted":
    st.info(
        "**Read in restricted mode.** The pickle holds Python objects of classes the safe loader refuses. Their "
        "tensors and plain values were read; each object became an inert record of its class and fields — "
        "nothing from the file was imported or called."
    )
    st.dataframe(foreign_table(ckpt), hide_index=True, width="stretch")

c = st.columns(4)
c[0].metric("Tensors", f"{ckpt.n_tensors:,}")
c[1].metric("Parameters", f"{ckpt.n_params:,}")
c[2].metric("LoRA share", f"{counts.loc['LoRA', 'share']:.1%}")
c[3].metric("File size", f"{ckpt.size_bytes / 2**20:.1f} MiB")
st.plotly_chart(plots.parameter_breakdown(counts), width="stretch")

left, right = st.columns([3, 2])
with left:
    st.subheader("Configuration")
    if ld.config is None:
        st.warning("No configuration: the tensors the family always has are missing.")
    else:
        st.caption(
            "Sizes are **inferred** from tensor shapes. **Assumptions** cannot be read from the weights; "
            "change them in the sidebar."
        )
        if "stored config" not in ckpt.require_config().provenance.get("num_heads", ""):
            st.info(
                "The stored config does not name the head count, so it is an assumption. **Hypotheses** ranks "
                "heads, mask, norm placement and LoRA scale by the checkpoint's loss on labelled data."
            )
            st.page_link(
                "app_pages/hypotheses.py", label="Which architecture was it trained with?", icon=":material/fact_check:"
            )
        table = config_table(ld.config)
        ui.table(
            table.style.apply(
                lambda r: ["background-color: #fff4e0" if r["kind"] == "assumption" else ""] * len(r), axis=1
            ),
            "configuration",
            "overview_config",
            full_height=True,
            column_config={"value": st.column_config.TextColumn(width="large")},
        )
with right:
    st.subheader("File")
    ui.table(file_table(ckpt), "file", "overview_file", full_height=True)
    st.subheader("Parameters")
    ui.table(
        counts.style.format({"parameters": "{:,}", "bytes": "{:,}", "share": "{:.1%}"}),
        "parameters",
        "overview_params",
        hide_index=False,
    )
    ui.table(dtypes, "dtypes", "overview_dtypes", hide_index=False)

st.subheader("Health scan")
for row in findings.itertuples():
    extra = f" — e.g. {ui.md_escape(row.examples)}" if row.examples else ""
    st.markdown(f"{ICONS[row.level]} **{row.check}**: {ui.md_escape(row.message)}{extra}")
with st.expander("Health scan as a table"):
    ui.table(findings, "health_scan", "overview_health")
for w in ckpt.warnings:
    st.warning(ui.md_escape(w))

st.subheader("Stored metadata")
meta = metadata_table(ckpt)
if meta.empty:
    st.caption("The file stores no metadata besides the weights (a bare state dict).")
else:
    ui.table(meta, "metadata", "overview_meta")
