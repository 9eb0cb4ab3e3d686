"""Helpers shared by the browser and many-session tests: the app's page list (the registry app.py uses, so new
pages are covered without editing the tests), a fingerprint of a model's state, and a free port."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import torch

from app_pages import PAGES, PageSpec

REPO = Path(__file__).resolve().parents[1]


def app_pages() -> list[PageSpec]:
    """The app's pages in menu order, from the page registry that app.py builds its navigation from."""
    return list(PAGES)


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
