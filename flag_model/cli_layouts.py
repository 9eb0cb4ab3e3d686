"""CLI subcommands `diff` and `convert` (registered by flag_model/__main__.py through add_parsers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import layouts
from .checkpoint import load_checkpoint


def add_parsers(sub: Any) -> None:
    """Add `diff` and `convert` to an argparse subparsers object; each sets func(args) -> exit code."""
    p = sub.add_parser(
        "diff",
        help="compare a checkpoint's keys and shapes with a target layout; explain and suggest fixes",
        description="Exit code 0 when the keys and shapes match the target, 1 when they differ, 2 on error.",
    )
    p.add_argument("path", help="checkpoint (.pt/.pth/.bin/.safetensors)")
    p.add_argument(
        "--against",
        required=True,
        metavar="TARGET",
        help=f"one of {', '.join(layouts.TARGETS)}, or the path of another checkpoint",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_diff)

    p = sub.add_parser(
        "convert",
        help="write the checkpoint in the native, merged (LoRA folded in) or stock PyTorch layout",
        description="native: FLAG-TRADER keys with LoRA; merged: the same keys without lora, base weights "
        "W + scale·(A@B)ᵀ (loads strictly into FlagTrader without LoRA); stock: "
        "nn.TransformerEncoderLayer names with in_proj_weight (encoder.layers.N.*).",
    )
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--to", required=True, choices=layouts.EXPORT_KINDS)
    p.add_argument(
        "--format",
        choices=layouts.EXPORT_FORMATS,
        default=None,
        help="default: from OUT's suffix (.safetensors), else pt",
    )
    p.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        help="scale for merging (an assumption; default: the stored config's alpha / r, else 1.0)",
    )
    p.set_defaults(func=run_convert)


def diff_report(path: str, against: str) -> dict[str, Any]:
    """Everything `diff` prints, as plain values."""
    ckpt = load_checkpoint(path)
    sd = ckpt.state_dict
    rec = layouts.recognise_checkpoint(ckpt)
    if against in layouts.TARGETS or against in layouts.TARGET_ALIASES:
        target, how = layouts.target_shapes(against, sd, ckpt.config, rec)
        flag_target = layouts.TARGET_ALIASES.get(against, against) in (
            "reconstruction",
            "native",
            "peft",
            "stock",
            "sketch",
        )
    elif Path(against).expanduser().exists():
        other = load_checkpoint(against)
        target, how = layouts.shapes_of(other.state_dict), f"keys of {other.source}"
        flag_target = False
    else:
        raise layouts.LayoutError(
            f"--against '{against}' is neither a known target ({', '.join(layouts.TARGETS)}) "
            "nor an existing checkpoint file."
        )
    diff = layouts.diff_keys(sd, target)
    scale = ckpt.config.lora_scale if ckpt.config else 1.0
    # A file recognised as a different model gets no rename chain towards FLAG-TRADER: it would only line up
    # the stems they share and look "nearly convertible".
    foreign = rec.best.score >= layouts.recognize.CLOSE and not rec.best.family.convertible and flag_target
    fixes = layouts.suggest_fixes(sd, target, lora_scale=scale) if not diff.ok and not foreign else []
    after = layouts.diff_keys(layouts.apply_fixes(layouts.meta_like(sd), fixes), target) if fixes else diff
    shapes = layouts.shapes_of(sd)
    return {
        "file": ckpt.source,
        "target": against,
        "target_description": how,
        "read_mode": ckpt.read_mode,
        "family": rec.to_dict(),
        "ranking_headline": rec.headline(),
        "ranking": rec.table()[["layout", "title", "score", "matched", "layout_keys", "sizes", "lora_rank"]].to_dict(
            "records"
        ),
        "counts": diff.counts(),
        "n_file": diff.n_file,
        "n_target": diff.n_target,
        "ok": diff.ok,
        "missing": [{"key": k, "shape": list(target[k])} for k in diff.missing],
        "unexpected": [{"key": k, "shape": list(shapes[k])} for k in diff.unexpected],
        "mismatched": [{"key": k, "file_shape": list(a), "target_shape": list(b)} for k, a, b in diff.mismatched],
        "explanations": [
            {"rule": e.rule, "message": e.message, "fixes": list(e.fixes)} for e in layouts.explain(sd, target, rec)
        ],
        "suggested_fixes": [{"id": f.id, "title": f.title, "detail": f.detail} for f in fixes],
        "no_fixes_because": (
            f"the file is a {rec.best.family.title} checkpoint, a different model: renames would "
            "only line up the stems they share"
        )
        if foreign and not diff.ok
        else None,
        "after_fixes": after.counts(),
    }


def run_diff(args: argparse.Namespace) -> int:
    rep = diff_report(args.path, args.against)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0 if rep["ok"] else 1
    c = rep["counts"]
    print(f"file:   {rep['file']} ({rep['n_file']} tensors)")
    print(f"        {rep['ranking_headline']}")
    print(f"target: {rep['target']} ({rep['n_target']} keys): {rep['target_description']}")
    print(
        f"result: {c['matched']}/{rep['n_target']} matched, {c['missing']} missing, {c['unexpected']} unexpected, "
        f"{c['mis-shaped']} mis-shaped" + (" — loads strictly" if rep["ok"] else "")
    )
    for title, rows, fmt in (
        ("missing (in the target, not in the file)", rep["missing"], lambda r: f"{r['key']}  {r['shape']}"),
        ("unexpected (in the file, not in the target)", rep["unexpected"], lambda r: f"{r['key']}  {r['shape']}"),
        ("mis-shaped", rep["mismatched"], lambda r: f"{r['key']}  file {r['file_shape']}  target {r['target_shape']}"),
    ):
        if rows:
            print(f"{title}: {len(rows)}")
            for r in rows:
                print(f"  {fmt(r)}")
    if rep["explanations"]:
        print("why:")
        for e in rep["explanations"]:
            print(f"  - [{e['rule']}] {e['message']}")
    if rep["no_fixes_because"]:
        print(f"no fixes suggested: {rep['no_fixes_because']}.")
    if rep["suggested_fixes"]:
        print("suggested fixes, in order:")
        for i, f in enumerate(rep["suggested_fixes"], 1):
            print(f"  {i}. {f['title']} — {f['detail']}")
        a = rep["after_fixes"]
        print(
            f"after the fixes: {a['matched']}/{rep['n_target']} matched, {a['missing']} missing, "
            f"{a['unexpected']} unexpected, {a['mis-shaped']} mis-shaped"
        )
    return 0 if rep["ok"] else 1


def run_convert(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    fmt = args.format or ("safetensors" if out.suffix == ".safetensors" else "pt")
    ckpt = load_checkpoint(args.path)
    native, cfg, fixes, note = layouts.export_plan(
        ckpt.state_dict, ckpt.stored_config, family_wins=False, lora_scale=args.lora_scale
    )
    scale = cfg.lora_scale
    data = layouts.export_file(native, args.to, fmt, ckpt.stored_config, lora_scale=scale, norm_first=cfg.norm_first)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"wrote {out}: {args.to} layout, {fmt}, {len(data) / 2**20:.1f} MiB")
    if fixes:
        print("fixes applied: " + "; ".join(f.title for f in fixes))
    if note:
        print(f"assumptions stored with the file: {note}")
    print(f"norm placement: {'pre-norm' if cfg.norm_first else 'post-norm'} ({cfg.provenance.get('norm_first', '')})")
    if args.to != "native" and cfg.lora_rank:
        how = "given" if args.lora_scale is not None else cfg.provenance.get("lora_scale")
        print(f"LoRA merged with scale {scale:g} ({how})")
    return 0
