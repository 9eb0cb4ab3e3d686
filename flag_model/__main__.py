"""Command line: `flag-trader {inspect,demo,...} ...` (the installed script) or `python -m flag_model ...`.
Errors go to stderr with exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .model import ModelMismatchError

# Subcommand modules each expose add_parsers(subparsers); every parser sets `func(args) -> int`.
_EXTENSIONS: tuple[str, ...] = ("cli_predict", "cli_layouts", "cli_whatif", "cli_hypotheses", "cli_importance")


def _inspect(args: argparse.Namespace) -> int:
    from .analysis.summary import inspect_dict

    info = inspect_dict(load_checkpoint(args.path))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['source']}: {info['format']}, {info['size_bytes'] / 2**20:.1f} MiB, {info['tensors']} tensors")
    print(
        f"  wrapper keys: {', '.join(info['wrapper_keys']) or '(bare state dict)'}; "
        f"weights under: {info['state_dict_key'] or '(top level)'}; "
        f"prefixes removed: {', '.join(info['prefixes_stripped']) or 'none'}"
    )
    print("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items()))
    print("  dtypes: " + ", ".join(f"{k} ×{v}" for k, v in info["dtypes"].items()))
    fam = info["family"]
    print(
        f"family: {fam['title']} ({fam['family']}), {fam['score']:.0%} of keys ({fam['matched']}/{fam['expected']})"
        if fam["confident"]
        else f"family: no confident match (closest {fam['title']}, {fam['score']:.0%})"
    )
    print(f"  {fam['headline']}")
    if fam["sizes"]:
        print(f"  sizes: {fam['sizes']}")
    print(
        f"  LoRA: rank {fam['lora_rank']}" + (f" on {', '.join(fam['lora_targets'])}" if fam["lora_targets"] else "")
        if fam["lora_rank"]
        else "  LoRA: none"
    )
    print(f"  converts to: {fam['converts_to']}")
    if fam.get("adapter_config"):
        a = fam["adapter_config"]
        print(
            f"  adapter config: r={a.get('r')}, lora_alpha={a.get('lora_alpha')}, rsLoRA={a.get('use_rslora')}, "
            f"targets={a.get('target_modules')}, base model={a.get('base_model_name_or_path')}; "
            f"scale {fam['lora_scale']} ({fam['lora_scale_source']})"
            if fam.get("lora_scale") is not None
            else ""
        )
    if info["read_mode"] == "restricted":
        print("  read in restricted mode: foreign objects became inert records, nothing from the file was called:")
        for where, cls in info["foreign_objects"].items():
            print(f"    {where}: {cls}")
    for k, v in info["metadata"].items():
        print(f"  meta {k}: {v[:100]}")
    if "config" in info:
        print("configuration (inferred from shapes unless marked assumption):")
        for k, v in info["config"].items():
            print(f"  {k:<12} {v!s:<10} {info['provenance'].get(k, '')}")
    print("load: " + ("fits the reconstruction strictly" if info["fits"] else "DOES NOT FIT\n" + info["config_error"]))
    for w in info["warnings"]:
        print(f"warning: {w}")
    for h in info["health"]:
        print(f"health [{h['level']}] {h['check']}: {h['message']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import shutil

    from .demo import build_demo

    def report(frac: float, msg: str) -> None:
        print(f"\r[{frac:4.0%}] {msg:<70}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    path = build_demo(args.size, progress=report, force=args.force)
    print(f"\n{args.size} demo ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out)
        path = Path(args.out)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Usage lines name the way it was started: the console script or `python -m` (argv[0] is then __main__.py).
    prog = "flag-trader" if Path(sys.argv[0]).stem == "flag-trader" else "python -m flag_model"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe a checkpoint: format, config with provenance, counts, health")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("demo", help="build (or reuse) the demo checkpoint and print its path")
    p.add_argument("--out", help="also copy it here")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_demo)
    for name in _EXTENSIONS:
        module = __import__(f"{__package__}.{name}", fromlist=["add_parsers"])
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CheckpointError, ConfigError, ModelMismatchError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
