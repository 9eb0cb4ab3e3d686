"""The page registry: every page of the app, in menu order. `app.py` builds its `st.Page`s from it and the tests
walk it, so a new page is one row here. Plain data: importing it runs no page and needs no streamlit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PageSpec:
    """One page: its script (relative to the repository root, as `st.Page` and `AppTest.switch_page` take it)."""

    file: str
    title: str
    icon: str
    default: bool = False

    @property
    def url_path(self) -> str:
        """The page's URL path in the browser: "" for the default page, else the file stem."""
        return "" if self.default else Path(self.file).stem


PAGES: tuple[PageSpec, ...] = (
    PageSpec("app_pages/overview.py", "Overview", ":material/summarize:", default=True),
    PageSpec("app_pages/tensors.py", "Tensor tree", ":material/account_tree:"),
    PageSpec("app_pages/architecture.py", "Architecture check", ":material/rule:"),
    PageSpec("app_pages/lora.py", "LoRA", ":material/tune:"),
    PageSpec("app_pages/attention.py", "Attention", ":material/visibility:"),
    PageSpec("app_pages/attributions.py", "Attributions", ":material/insights:"),
    PageSpec("app_pages/predictions.py", "Predictions", ":material/candlestick_chart:"),
    PageSpec("app_pages/whatif.py", "What-if", ":material/science:"),
    PageSpec("app_pages/hypotheses.py", "Hypotheses", ":material/fact_check:"),
)
