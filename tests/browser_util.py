"""Helpers shared by the browser and many-session tests: the app's page list (read from app.py, so new
pages are covered without editing the tests), a fingerprint of a model's state, and a free port."""

from __future__ import annotations

import ast
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PageSpec:
    """One `st.Page(...)` entry of app.py's PAGES list."""

    file: str  # "app_pages/overview.py", as AppTest.switch_page takes it
    title: str
    default: bool

    @property
    def url_path(self) -> str:
        """The page's URL path in the browser: "" for the default page, else the file stem."""
        return "" if self.default else Path(self.file).stem


def app_pages(app: Path = REPO / "app.py") -> list[PageSpec]:
    """The pages in app.py's `PAGES = [st.Page(...), ...]`, in order (parsed, not imported)."""
    tree = ast.parse(app.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PAGES" for t in node.targets):
            pages = []
            for call in node.value.elts:
                kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if isinstance(k.value, ast.Constant)}
                file = ast.literal_eval(call.args[0])
                pages.append(PageSpec(file, kw.get("title", Path(file).stem), bool(kw.get("default", False))))
            return pages
    raise AssertionError("app.py has no PAGES list")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over everything a page could change in place: parameter and buffer values, dtypes and
    requires_grad, train/eval mode, every LoRALinear's scale and lora_enabled, and the hooks left behind."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.requires_grad}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for name, m in model.named_modules():
        hooks = sum(
            len(getattr(m, a, {}))
            for a in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
            )
        )
        h.update(f"{name}:{m.training}:{hooks}:{getattr(m, 'scale', '')}:{getattr(m, 'lora_enabled', '')}".encode())
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
