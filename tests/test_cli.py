"""The command line: inspect describes the demo and a d=768 file; errors go to stderr without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO, full_layout_config

from flag_model.__main__ import main
from flag_model.model import expected_shapes


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flag_model", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_inspect_demo(tiny_demo_path, capsys):
    assert main(["inspect", str(tiny_demo_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fits"] and info["tensors"] == 63
    assert info["config"]["d_model"] == 32 and info["assumptions"]["num_heads"] == 4
    assert info["metadata"]["feature_set"] == "simple-60"
    assert main(["inspect", str(tiny_demo_path)]) == 0
    text = capsys.readouterr().out
    assert "fits the reconstruction strictly" in text and "assumption: stored config['num_heads']" in text


def test_inspect_d768_file(tmp_path):
    shapes = expected_shapes(full_layout_config(768, 3072))
    # One stored element per tensor, broadcast to the full shape: the layout of the 336 MB file in kilobytes.
    sd = {k: torch.full((1,), 0.02).expand(s) for k, s in shapes.items()}
    path = tmp_path / "flag_trader_best.pt"
    torch.save({"model": sd, "config": {"n_heads": 12, "lora_alpha": 16, "lora_rank": 16}}, path)
    proc = _cli("inspect", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["tensors"] == 343 and info["parameters"]["total"] == 87_955_971
    assert info["config"]["d_model"] == 768 and info["config"]["ffn_dim"] == 3072
    assert info["assumptions"]["num_heads"] == 12 and info["fits"]


def test_errors_go_to_stderr_without_traceback(tmp_path):
    bad = tmp_path / "flag_trader_best.pt"
    bad.write_text("not a checkpoint")
    proc = _cli("inspect", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = _cli("inspect", str(tmp_path / "missing.pt"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_demo_command_copies_to_out(tiny_demo_path, tmp_path, capsys):
    out = tmp_path / "demo.pt"
    assert main(["demo", "--size", "tiny", "--out", str(out)]) == 0
    assert out.read_bytes() == tiny_demo_path.read_bytes()
