"""The only Streamlit-aware library code: cached loaders, session keys and the shared sidebar.

Checkpoints and models are cached per content digest with `st.cache_resource`, so they are shared by all
sessions and must be treated as read-only. What a user uploads lives in their own session state only.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from pandas.io.formats.style import Styler
from streamlit.runtime.scriptrunner import get_script_run_ctx

from .. import demo
from ..analysis.summary import assumptions_line
from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint
from ..config import ConfigError, ModelConfig
from ..data import (
    FeatureMatrix,
    IntervalCheck,
    check_interval,
    checkpoint_features,
    detect_columns,
    format_timedelta,
    frame_digest,
    prepare_ohlcv,
    training_interval,
)
from ..features import LabelRule
from ..model import FlagTrader, ModelMismatchError, build_model
from ..server_paths import ROOT_ENV, ServerPathError, resolve_under_root, server_root
from ..tables import table_bytes
from .layouts import fixed_or
from .session import MARKET, MarketData, draw_data_slot, keep, keep_widget_state
from .session import int_slider as int_slider  # re-exported: pages call ui.int_slider / ui.window_length
from .session import window_length as window_length

# Session keys other pages rely on.
LOADED = "_flag_loaded"
_DRAWN = "_flag_sidebar_run"  # token of the script run that last drew the sidebar

SOURCES = ("Demo", "Upload", "Server path")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:])")


def md_escape(text: object) -> str:
    """User-supplied text (a file name, a key, a CSV cell) made inert for `st.markdown`/`st.error`/captions:
    every markdown/HTML character is backslash-escaped, so a crafted name cannot become a link, image or markup."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def download_table(df: pd.DataFrame, stem: str, key: str, label: str = "Download") -> None:
    """CSV and Parquet download buttons for a table; every download in the app goes through here, so each one
    is formula-safe (see `flag_model.tables`). `key` must be unique on the page."""
    c1, c2 = st.columns(2)
    c1.download_button(
        f"{label} CSV", lambda: table_bytes(df, "csv"), f"{stem}.csv", "text/csv", key=f"{key}_csv", on_click="ignore"
    )
    c2.download_button(
        f"{label} Parquet",
        lambda: table_bytes(df, "parquet"),
        f"{stem}.parquet",
        "application/vnd.apache.parquet",
        key=f"{key}_parquet",
        on_click="ignore",
    )


def table(df: pd.DataFrame | Styler, stem: str, key: str, full_height: bool = False, **kwargs) -> None:
    """`st.dataframe` with its download (`download_table`); full_height shows every row without scrolling
    (short tables whose last rows matter, e.g. the configuration)."""
    data = df.data if isinstance(df, Styler) else df
    if full_height:
        kwargs["height"] = 38 + 35 * len(data)
    st.dataframe(df, **{"hide_index": True, "width": "stretch", **kwargs})
    download_table(data if isinstance(data.index, pd.RangeIndex) else data.reset_index(), stem, key)


def server_folder() -> Path | None:
    """The folder server paths are read under: FLAG_TRADER_SERVER_ROOT, else `server_root` in
    .streamlit/secrets.toml; None (server paths off) when neither names a folder."""
    configured = st.secrets.get("server_root") if st.secrets.load_if_toml_exists() else None
    return server_root(configured if isinstance(configured, str) else None)


SERVER_PATHS_OFF = (
    f"Server paths are off on this server. The operator turns them on by naming a folder in "
    f"{ROOT_ENV} (or `server_root` in .streamlit/secrets.toml); only files inside it can be opened. "
    "Upload the file instead."
)


def server_path_input(label: str, key: str, placeholder: str, where=None) -> Path | None:
    """A text field for a file inside the server folder -> its resolved path; None when empty. With no folder
    configured a caption says why and a typed path is refused unread. Raises ServerPathError (one message for
    missing and not allowed)."""
    where = where or st
    root = server_folder()
    text = where.text_input(
        label,
        key=key,
        placeholder=placeholder,
        help=f"A file inside the server folder {md_escape(root)} (relative to it, or its full "
        "path). Read on the machine running the app."
        if root
        else SERVER_PATHS_OFF,
    )
    if root is None:
        where.caption(SERVER_PATHS_OFF)
        if text.strip():  # nothing is read, whatever the path
            raise ServerPathError(SERVER_PATHS_OFF)
        return None
    return resolve_under_root(text, root) if text.strip() else None


def data_tag(data_key: str) -> str:
    """A short widget-key tag from a hash of the whole data key (two files in one folder never share widgets)."""
    return hashlib.sha256(data_key.encode()).hexdigest()[:16]


class LazyProgress:
    """A progress bar that appears only once work has run `delay` seconds, so quick work shows none.
    Call it as `progress(fraction, message)` from the work; `done()` removes it."""

    def __init__(self, delay: float = 1.0) -> None:
        self._slot = st.empty()
        self._start = time.monotonic()
        self._delay = delay

    def __call__(self, fraction: float, message: str) -> None:
        if time.monotonic() - self._start >= self._delay:
            self._slot.progress(min(max(fraction, 0.0), 1.0), text=md_escape(message))

    def done(self) -> None:
        self._slot.empty()


_FREEZE_LOCK = threading.Lock()
_frozen_at = 0  # len(sys.modules) when the long-lived objects were last frozen


def freeze_long_lived() -> None:
    """Keep Streamlit's garbage collection after every script run (runner.postScriptGC) cheap.

    That `gc.collect(2)` walks every tracked Python object; with torch, plotly, pandas and captum imported those are
    about 400,000 (functions, classes, module dicts) and the walk took 0.4-1.5 s after every click, before the
    browser heard that the run had ended. Whenever modules were imported since the last time, the objects alive
    are collected once and then moved to the permanent generation (`gc.freeze`), which the collections skip; what
    the app makes afterwards is collected as before. It happens a few times per process (each page's first
    imports), so the few short-lived objects frozen with the modules are bounded."""
    global _frozen_at
    if len(sys.modules) <= _frozen_at:
        return
    with _FREEZE_LOCK:
        if len(sys.modules) > _frozen_at:
            _frozen_at = len(sys.modules)
            gc.collect()
            gc.freeze()


def demo_size() -> str:
    """ "full" (the documented 343-tensor layout) unless FLAG_TRADER_DEMO_SIZE says "tiny" (tests)."""
    return os.environ.get("FLAG_TRADER_DEMO_SIZE", "full")


@dataclass(frozen=True)
class Loaded:
    """What the sidebar opened for this session: checkpoint, model (None if it does not fit), and why not."""

    ckpt: Checkpoint | None
    model: FlagTrader | None
    config: ModelConfig | None
    error: str | None


@st.cache_resource(max_entries=4, show_spinner="Reading checkpoint…")
def _checkpoint_from_bytes(digest: str, name: str, _data: bytes) -> Checkpoint:
    return load_checkpoint(_data, name=name)


@st.cache_resource(max_entries=4, show_spinner="Reading checkpoint…")
def _checkpoint_from_path(path: str, mtime: float, size: int) -> Checkpoint:
    return load_checkpoint(path)


@st.cache_resource(max_entries=6, show_spinner="Building the model…")
def _model(
    digest: str, num_heads: int, lora_scale: float, norm_first: bool, causal: bool, _ckpt: Checkpoint
) -> tuple[FlagTrader | None, str | None]:
    try:
        return build_model(
            _ckpt, num_heads=num_heads, lora_scale=lora_scale, norm_first=norm_first, causal=causal
        ), None
    except (ModelMismatchError, ConfigError) as exc:
        return None, str(exc)


@st.cache_data(max_entries=2, show_spinner="Generating demo market data…")
def demo_market(size: str) -> pd.DataFrame:
    """The demo bars as an upload of them is prepared (times as datetime64[ns]): the model pages and Predictions
    then hold equal frames, so features computed by one are found in `shared_features`' cache by the others."""
    bars = demo.demo_data(size)
    return prepare_ohlcv(bars, detect_columns(bars.columns)).valid_frame()


def open_checkpoint_file(src: str | os.PathLike | bytes, name: str | None = None) -> Checkpoint:
    """A checkpoint through the shared cache: bytes by digest, paths by (path, mtime, size)."""
    if isinstance(src, bytes):
        return _checkpoint_from_bytes(hashlib.sha256(src).hexdigest(), name or "upload", src)
    path = Path(src).expanduser().resolve()
    stat = path.stat() if path.is_file() else None
    return _checkpoint_from_path(str(path), stat.st_mtime if stat else 0.0, stat.st_size if stat else -1)


DEMO_SOURCE = "built-in demo"


@st.cache_resource(max_entries=2, show_spinner="Reading the demo checkpoint…")
def _demo_checkpoint(path: str, mtime: float, size: int) -> Checkpoint:
    """The demo checkpoint, named as the built-in demo rather than by its cache path."""
    return dataclasses.replace(load_checkpoint(path), source=DEMO_SOURCE)


def _open_demo() -> Checkpoint | None:
    """The cached demo checkpoint; None while it is being built in the background (never blocks)."""
    size = demo_size()
    path = demo.demo_path(size)
    if not path.exists():
        demo.start_build(size)  # one build per process, shared by every session
        return None
    stat = path.stat()
    return _demo_checkpoint(str(path), stat.st_mtime, stat.st_size)


def _build_text(status: demo.BuildStatus) -> str:
    left = "estimating the time left" if status.seconds_left is None else f"about {status.seconds_left:.0f} s left"
    return f"Building the demo checkpoint (once): {status.message} — {left}"


@st.fragment(run_every=1.0)
def _build_progress() -> None:
    """Progress of the background demo build, refreshed every second; reruns the page when it is done."""
    statuses = demo.running_builds()
    for status in statuses:
        if status.error:
            st.error(
                f"The demo checkpoint could not be built: {md_escape(status.error)}. "
                "Reload the page to try again; Upload and Server path work meanwhile."
            )
        else:
            st.progress(min(status.fraction, 1.0), text=_build_text(status))
    if not statuses:
        st.rerun()  # the build finished: rerun the page, which then shows the demo (and no more of this)


# Widgets are drawn inside each page's run, so Streamlit would forget their values on a page switch; every
# settings widget is kept (session.keep_widget_state), and the uploaded file is kept in this session's state.
_UPLOAD = "ckpt_upload"
_KEPT_UPLOAD = "_flag_kept_upload"  # (name, bytes) of this session's uploaded checkpoint


def upload_limit_note(what: str = "files") -> str:
    """Where to go when a file is above the upload limit (the browser refuses it before the app sees it)."""
    return (
        f"Up to {st.get_option('server.maxUploadSize')} MB here. Larger {what} (the d=768 checkpoint is 336 MB): "
        "use **Server path**, which reads the file on the machine running the app."
    )


def _remember_upload() -> None:
    up = st.session_state.get(_UPLOAD)
    st.session_state[_KEPT_UPLOAD] = (up.name, up.getvalue()) if up is not None else None


def _open_selected() -> Checkpoint | None:
    source = st.sidebar.radio("Checkpoint source", SOURCES, key=keep("ckpt_source"), horizontal=True)
    if source == "Demo":
        return _open_demo()
    if source == "Upload":
        up = st.sidebar.file_uploader(
            "Checkpoint file",
            type=["pt", "pth", "bin", "safetensors"],
            key=_UPLOAD,
            on_change=_remember_upload,
            help="Up to the server's upload limit (see .streamlit/config.toml); use 'Server path' for larger files.",
        )
        st.sidebar.caption(upload_limit_note("checkpoints"))
        if up is not None:
            return open_checkpoint_file(up.getvalue(), up.name)
        kept = st.session_state.get(_KEPT_UPLOAD)
        if kept is None:
            return None
        st.sidebar.caption(f"Using **{md_escape(kept[0])}**, uploaded earlier in this session.")
        return open_checkpoint_file(kept[1], kept[0])
    try:
        path = server_path_input("Path on the server", keep("ckpt_path"), "flag_trader_best.pt", st.sidebar)
    except ServerPathError as exc:
        raise CheckpointError(str(exc)) from None
    return open_checkpoint_file(path) if path is not None else None


def _assumption_widgets(cfg: ModelConfig, digest: str) -> ModelConfig:
    """Widgets for what the weights cannot tell; keys carry the digest so a new file starts from its defaults."""
    sb = st.sidebar
    sb.markdown("**Assumptions** — not recoverable from the weights")
    tag = digest[:12]
    # The stored value is always offered, so a head count above 64 is never silently replaced.
    defaults = {
        f"heads_{tag}": cfg.num_heads,
        f"scale_{tag}": float(cfg.lora_scale),
        f"norm_{tag}": "pre-norm" if cfg.norm_first else "post-norm",
        f"causal_{tag}": cfg.causal,
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    chosen = st.session_state[f"heads_{tag}"]  # e.g. adopted from Hypotheses: may be a divisor above 64
    heads_options = sorted(
        {h for h in range(1, min(cfg.d_model, 64) + 1) if cfg.d_model % h == 0}
        | {cfg.num_heads}
        | ({chosen} if isinstance(chosen, int) and chosen > 0 and cfg.d_model % chosen == 0 else set())
    )

    def why(name: str) -> str:  # provenance names keys and stored values from the file: shown inert
        return md_escape(cfg.provenance.get(name, ""))

    heads = sb.selectbox("Attention heads", heads_options, key=keep(f"heads_{tag}"), help=why("num_heads"))
    scale = sb.number_input(
        "LoRA scale (alpha / r)", min_value=0.0, step=0.25, key=keep(f"scale_{tag}"), help=why("lora_scale")
    )
    norm = sb.radio(
        "Norm placement", ("post-norm", "pre-norm"), horizontal=True, key=keep(f"norm_{tag}"), help=why("norm_first")
    )
    causal = sb.toggle("Causal mask", key=keep(f"causal_{tag}"), help=why("causal"))
    return cfg.with_assumptions(num_heads=heads, lora_scale=scale, norm_first=norm == "pre-norm", causal=causal)


def set_assumptions(digest: str, num_heads: int, lora_scale: float, norm_first: bool, causal: bool) -> None:
    """Set the sidebar's assumption widgets of checkpoint `digest`; call it from a widget callback, which runs
    before the sidebar is drawn (Streamlit refuses changes to a widget already drawn in the same run)."""
    tag = digest[:12]
    st.session_state[f"heads_{tag}"] = int(num_heads)
    st.session_state[f"scale_{tag}"] = float(lora_scale)
    st.session_state[f"norm_{tag}"] = "pre-norm" if norm_first else "post-norm"
    st.session_state[f"causal_{tag}"] = bool(causal)


def _run_token() -> object:
    """An object that is new for every script run (Streamlit replaces the cursor dict in each reset)."""
    ctx = get_script_run_ctx()
    return ctx.cursors if ctx is not None else None


def sidebar() -> Loaded:
    """Checkpoint source, assumptions and a load status that is never silent; drawn once per run.

    Pages draw it through `loaded()` / `require_*()`, from inside the page run: AppTest re-executes only
    the page script on reruns under st.navigation, so an entrypoint-only sidebar would vanish there.
    """
    token = _run_token()
    if token is not None and st.session_state.get(_DRAWN) is token:
        return st.session_state[LOADED]
    st.session_state[_DRAWN] = token
    keep_widget_state()
    st.sidebar.header("FLAG-TRADER Explorer")
    if st.session_state.get("ckpt_source", SOURCES[0]) == "Demo" and not demo.demo_path(demo_size()).exists():
        demo.start_build(demo_size())  # in the background, before the progress below is drawn
    if demo.running_builds():  # right under the header: the same place in every run, so it is never drawn twice
        with st.sidebar:
            _build_progress()
    try:
        ckpt = fixed_or(_open_selected(), open_checkpoint_file)
    except CheckpointError as exc:
        st.sidebar.error(f"Could not open the checkpoint: {md_escape(exc)}")
        loaded = Loaded(None, None, None, str(exc))
    else:
        if ckpt is None and st.session_state.get("ckpt_source", SOURCES[0]) == "Demo":
            loaded = Loaded(
                None,
                None,
                None,
                "the built-in demo is being built — its progress is in the sidebar; "
                "Upload and Server path work meanwhile",
            )
        elif ckpt is None:
            st.sidebar.info("Choose a checkpoint file.")
            loaded = Loaded(None, None, None, "no checkpoint chosen")
        elif ckpt.config is None:
            st.sidebar.error(
                f"{ckpt.n_tensors} tensors read, but the file does not fit — see Architecture.\n\n"
                f"{md_escape(ckpt.config_error)}"
            )
            loaded = Loaded(ckpt, None, None, ckpt.config_error)
        else:
            cfg = _assumption_widgets(ckpt.config, ckpt.digest)
            bar, bar_source = training_interval(ckpt.meta)
            st.sidebar.caption(f"Training bar interval: **{format_timedelta(bar)}** — {bar_source}.")
            model, err = _model(ckpt.digest, cfg.num_heads, cfg.lora_scale, cfg.norm_first, cfg.causal, ckpt)
            if model is None:
                st.sidebar.error(
                    f"Does not fit — see Architecture ({assumptions_line(ckpt.config, cfg)}).\n\n{md_escape(err)}"
                )
            else:
                st.sidebar.success(
                    f"{ckpt.n_tensors}/{ckpt.n_tensors} tensors loaded strictly · {assumptions_line(ckpt.config, cfg)}"
                )
            for w in ckpt.warnings:
                st.sidebar.warning(md_escape(w))
            loaded = Loaded(ckpt, model, cfg, err)
    st.session_state[LOADED] = loaded
    draw_data_slot(market_data())
    return loaded


def loaded() -> Loaded:
    """This session's checkpoint and model (draws the sidebar if this run has not yet)."""
    return sidebar()


def require_checkpoint() -> Checkpoint:
    """The open checkpoint, or a message and a stop of this page's script."""
    ld = loaded()
    if ld.ckpt is None:
        st.info(f"Open a checkpoint in the sidebar first ({md_escape(ld.error)}).")
        st.stop()
    return ld.ckpt


def require_model() -> tuple[Checkpoint, FlagTrader]:
    """The open checkpoint and its (shared, read-only) model, or a message and a stop."""
    ckpt = require_checkpoint()
    ld = loaded()
    if ld.model is None:
        st.error(
            f"This checkpoint does not load into the reconstruction, so this page cannot run. "
            f"The Architecture page shows why.\n\n{md_escape(ld.error)}"
        )
        st.stop()
    return ckpt, ld.model


def market_data() -> MarketData:
    """This session's current data: OHLCV given on the Predictions page (kept across pages), else the demo market."""
    if MARKET in st.session_state:
        return st.session_state[MARKET]
    return MarketData("demo market (synthetic)", demo_market(demo_size()), "demo")


def shared_features(digest: str, state_dim: int, ohlcv: pd.DataFrame, meta: dict) -> tuple[FeatureMatrix, str]:
    """checkpoint_features(ohlcv, meta, state_dim) with the checkpoint's normalisation, and a digest of the values;
    cached by the bars' exact content, so the model pages and Predictions compute them once for the same data."""
    return _shared_features(digest, state_dim, frame_digest(ohlcv), ohlcv, meta)


@st.cache_data(max_entries=4, show_spinner="Computing features…")
def _shared_features(
    digest: str, state_dim: int, bars: str, _ohlcv: pd.DataFrame, _meta: dict
) -> tuple[FeatureMatrix, str]:
    """`bars` is frame_digest(_ohlcv)."""
    fm = checkpoint_features(_ohlcv, _meta, state_dim)
    return fm, hashlib.sha256(fm.values.tobytes()).hexdigest()[:16]


def market_features(ckpt: Checkpoint, state_dim: int) -> tuple[str, FeatureMatrix, str]:
    """market_data() turned into this checkpoint's features: (market name, FeatureMatrix, data key); the bar
    interval notice and the feature warnings are shown.

    The data key is a digest of the feature values, for keying caches of results computed on them.
    Data that cannot be featurised gives a message and stops the page.
    """
    data = market_data()
    name, ohlcv = data.name, data.frame
    try:
        fm, key = shared_features(ckpt.digest, state_dim, ohlcv, dict(ckpt.meta))
    except (ValueError, KeyError) as exc:
        st.error(
            f"Could not compute features from {md_escape(name)}: {md_escape(exc)}. Check the upload on the "
            "Predictions page."
        )
        st.stop()
    interval_notice(fm.times, ckpt.meta)
    for w in fm.warnings:
        st.warning(md_escape(w))
    return name, fm, key


def interval_notice(times: pd.DatetimeIndex | pd.Series, meta: dict, horizon: int | None = None) -> IntervalCheck:
    """The data's bar interval against the checkpoint's training interval: a warning when they differ (a caption
    when they agree), and the gaps in an expander. `horizon` (bars, default: the checkpoint's label rule) is
    also given in time."""
    if horizon is None:
        horizon = LabelRule.from_meta(meta)[0].horizon
    check = check_interval(times, meta, horizon)
    (st.caption if check.matches else st.warning)(check.message)  # only numbers and durations: no user text
    gaps = check.data.gaps
    if len(gaps):
        with st.expander(f"{len(gaps):,} gap(s) longer than 1.5 bars — windows across them mix distant bars"):
            st.dataframe(gaps.head(1000).astype({"gap": str}), hide_index=True, width="stretch")
            if len(gaps) > 1000:
                st.caption(f"The first 1,000 of {len(gaps):,} gaps.")
    return check


def second_checkpoint(key: str, prompt: str) -> Checkpoint:
    """Upload or server-path widgets for a checkpoint to compare with; stops the page (with `prompt`) until one
    is chosen, and shows a CheckpointError in red instead of failing."""
    up = st.file_uploader("Second checkpoint", type=["pt", "pth", "bin", "safetensors"], key=f"{key}_second_upload")
    try:
        path = server_path_input("…or its path on the server", keep(f"{key}_second_path"), "other_checkpoint.pt")
        if up is not None:
            return open_checkpoint_file(up.getvalue(), up.name)
        if path is None:
            st.info(prompt)
            st.stop()
        return open_checkpoint_file(path)
    except (CheckpointError, ServerPathError) as exc:
        st.error(f"Could not open the second checkpoint: {md_escape(exc)}")
        st.stop()
