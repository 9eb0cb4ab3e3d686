"""Streamlit pieces of the Architecture and Overview pages that show a recognised layout family, the fixed
checkpoint hook and the export panel (the library calls live in flag_model.layouts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from .. import layouts
from ..checkpoint import Checkpoint

FIXED = "_flag_fixed_checkpoint"  # session key: {"origin": digest, "name": str, "data": bytes, "note": str}


@st.cache_resource(max_entries=8, show_spinner="Recognising the layout…")  # frozen, read-only
def _recognise(digest: str, _ckpt: Checkpoint) -> layouts.Recognition:
    return layouts.recognise_checkpoint(_ckpt)


def recognition(ckpt: Checkpoint) -> layouts.Recognition:
    """The one recognition result of this checkpoint (cached per digest), shared by every page."""
    return _recognise(ckpt.digest, ckpt)


def family_panel(rec: layouts.Recognition) -> None:
    """Headline, the family's explanation (what it is, sizes, LoRA, evidence, what it converts to)."""
    from . import md_escape

    best = rec.best
    (st.success if rec.confident else st.warning)(md_escape(rec.headline()))
    lines = [f"**{md_escape(best.family.title)}** — {md_escape(best.family.description)}."]
    if best.size is not None:
        lines.append(f"- **Sizes read from the file:** {md_escape(best.size.summary())}")
    if best.lora_rank:
        lines.append(f"- **LoRA:** rank {best.lora_rank} on {md_escape(', '.join(best.lora_targets()))}")
    if rec.adapter_config:
        scale, how = layouts.lora_scale_for(rec)
        a = rec.adapter_config
        lines.append(
            f"- **Adapter config:** r={a.get('r')}, alpha={a.get('lora_alpha')}, "
            f"rsLoRA={a.get('use_rslora')}, "
            f"targets {md_escape(a.get('target_modules'))}, base model "
            f"{md_escape(a.get('base_model_name_or_path'))}"
            + (f"; scale {scale:.3g} ({md_escape(how)})" if scale is not None else "")
        )
    lines.append(f"- **Evidence keys:** {md_escape(', '.join(best.evidence[:4]) or 'none')}")
    lines.append(f"- **Converts to:** {md_escape(best.family.converts_to)}")
    if not rec.confident and rec.unexplained:
        lines.append(
            "- **Largest unexplained key groups:** "
            + md_escape(", ".join(f"{g} ({n} keys)" for g, n in rec.unexplained))
        )
    st.markdown("\n".join(lines))


def use_fixed(ckpt: Checkpoint, source: dict, stored: dict | None, assumptions: dict[str, Any]) -> None:
    """A button that makes the fixed state dict (as a native file with its config) this session's checkpoint;
    the file is written only when the button is pressed."""
    if not st.button(
        "Use the fixed checkpoint",
        key="arch_use_fixed",
        help="Every page then works on the fixed model (kept in this session only; the sidebar can switch back).",
    ):
        return
    try:
        data = layouts.export_file(source, "native", "pt", stored, **assumptions)
    except (layouts.LayoutError, ValueError) as exc:
        st.error(f"The fixed checkpoint cannot become the session's checkpoint: {exc}")
        return
    st.session_state[FIXED] = {"origin": ckpt.digest, "name": f"{Path(ckpt.source).stem}-fixed.pt", "data": data}
    st.rerun()


def stock_panel(key: str, source: dict, stored: dict | None, assumptions: dict[str, Any], stem: str) -> None:
    """For a stock export: the loading snippet and the max |Δlogit| of rebuilding it from its stored config.
    `key` identifies `source` (file digest and the fixes applied) for the cache."""
    st.caption(
        "The stock file stores activation='gelu', norm_first, batch_first, layer_norm_eps, nhead and "
        "dim_feedforward in its config; rebuild it with stock torch modules only:"
    )
    st.code(layouts.stock_snippet(f"{stem}-stock.pt"), language="python")
    try:
        check = _reload_check(key, tuple(sorted(assumptions.items())), source, stored)
    except (layouts.LayoutError, ValueError, RuntimeError) as exc:
        st.error(f"Reload check failed: {exc}")
        return
    (st.success if check.max_abs_logit_diff < 1e-4 else st.error)(
        f"Reload check: rebuilt from the stored config with nn.TransformerEncoderLayer, loaded strictly; max |Δlogit| "
        f"against the reconstruction = {check.max_abs_logit_diff:.2e} on {check.windows} random windows of "
        f"{check.length} steps."
    )


@st.cache_data(max_entries=8, show_spinner="Checking the stock export…")
def _reload_check(key: str, assumptions: tuple, _source: dict, _stored: dict | None) -> layouts.ReloadCheck:
    return layouts.stock_reload_check(_source, _stored, **dict(assumptions))


def fixed_or(ckpt: Checkpoint | None, open_file) -> Checkpoint | None:
    """The sidebar hook: this session's fixed checkpoint when it was made from `ckpt`, else `ckpt`."""
    from . import md_escape

    fixed = st.session_state.get(FIXED)
    if ckpt is None or fixed is None or fixed["origin"] != ckpt.digest:
        return ckpt
    if st.sidebar.button("Back to the original file", key="fixed_revert"):
        del st.session_state[FIXED]
        return ckpt
    st.sidebar.info(f"Using the fixed checkpoint **{md_escape(fixed['name'])}** made on the Architecture page.")
    return open_file(fixed["data"], fixed["name"])


def target_sizes(size: layouts.LayoutSize, digest: str) -> tuple[dict[str, int], str]:
    """The "Target sizes" expander (what another loader may have assumed): the sizes changed from the file's, and
    a key naming the choice (for caches and per-target widget keys)."""
    from . import keep

    with st.expander("Target sizes — e.g. what another loader assumed"):
        s = st.columns(3)
        d = s[0].number_input("hidden size d", 1, value=size.d_model, key=keep(f"arch_d_{digest[:12]}"))
        f = s[1].number_input("FFN width F", 1, value=max(size.ffn_dim, 1), key=keep(f"arch_f_{digest[:12]}"))
        n = s[2].number_input("blocks", 1, value=max(size.n_blocks, 1), key=keep(f"arch_n_{digest[:12]}"))
    given = (("d_model", d, size.d_model), ("ffn_dim", f, max(size.ffn_dim, 1)), ("n_blocks", n, max(size.n_blocks, 1)))
    return {k: v for k, v, was in given if v != was}, f"{d}-{f}-{n}"


APPLIED = "arch_applied"  # session key: (digest, target key, fix ids, drop) of the fixes applied with the button


@st.cache_data(max_entries=16, show_spinner="Searching for fixes…")
def _fixes(digest: str, target_key: str, scale: float, _sd, _target) -> list:
    return layouts.suggest_fixes(_sd, _target, lora_scale=scale)


def fix_panel(ckpt: Checkpoint, target: dict, target_key: str, scale: float) -> tuple | None:
    """The suggested fixes as an ordered multiselect and the Apply button; returns what is applied now
    (digest, target key, fix ids, drop extra keys), or None."""
    from . import keep, md_escape

    fixes = _fixes(ckpt.digest, target_key, scale, ckpt.state_dict, target)
    applied = st.session_state.get(APPLIED)
    if fixes:
        st.subheader("Fix")
        by_id = {fx.id: fx for fx in fixes}
        chosen = st.multiselect(
            "Fixes to apply, in order",
            list(by_id),
            default=list(by_id),
            format_func=lambda i: by_id[i].title,
            key=keep(f"arch_fixes_{target_key}"),
        )
        st.markdown(
            "\n".join(f"{i}. **{by_id[x].title}** — {md_escape(by_id[x].detail)}" for i, x in enumerate(chosen, 1))
        )
        drop = st.checkbox("Also drop the keys the target has no place for", key=keep(f"arch_drop_{target_key}"))
        if st.button("Apply fixes", type="primary", key="arch_apply"):
            applied = st.session_state[APPLIED] = (ckpt.digest, target_key, tuple(chosen), drop)
    return applied


@st.cache_data(max_entries=16, show_spinner=False)
def _export_problem(digest: str, applied: Any, fixed: bool, kind: str, _source: dict) -> str | None:
    """layouts.export_problem per file, applied fixes and kind: it builds the model on the meta device (about half
    a second for 12 blocks), which every rerun of the page would repeat."""
    return layouts.export_problem(_source, kind)


def export_panel(ckpt: Checkpoint, source: dict, scale: float, assumptions: dict[str, Any], applied: Any) -> None:
    """Layout and format radios, the download of `source` converted, and for a stock export its reload check."""
    from . import keep, md_escape

    st.subheader("Export")
    e1, e2 = st.columns(2)
    kind = e1.radio(
        "Layout",
        layouts.EXPORT_KINDS,
        horizontal=True,
        key=keep("arch_export_kind"),
        help="native: FLAG-TRADER keys with LoRA · merged: W + scale·(A@B)ᵀ under the native names, no lora "
        "keys · stock: nn.TransformerEncoderLayer names (encoder.layers.N.self_attn.in_proj_weight …)",
    )
    fmt = e2.radio("Format", layouts.EXPORT_FORMATS, horizontal=True, key=keep("arch_export_fmt"))
    problem = _export_problem(ckpt.digest, applied, source is not ckpt.state_dict, kind, source)
    if problem:
        st.error(f"Cannot export as {kind}: {md_escape(problem)}")
        return
    if kind != "native":
        st.caption(f"LoRA is merged with scale {scale:g} — the LoRA-scale assumption from the sidebar.")
    stem = Path(ckpt.source).stem  # the download callable runs later, on another thread: `source` is bound here
    st.download_button(
        f"Download {kind} .{fmt}",
        lambda: layouts.export_file(source, kind, fmt, ckpt.stored_config, **assumptions),
        file_name=f"{stem}-{kind}.{fmt}",
        key="arch_download",
        on_click="ignore",
    )
    if kind == "stock":
        stock_panel(f"{ckpt.digest}-{applied}", source, ckpt.stored_config, assumptions, stem)
