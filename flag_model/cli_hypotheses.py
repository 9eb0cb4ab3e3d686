"""The `hypotheses` subcommand: rank heads x mask x norm placement x LoRA scale on labelled OHLCV data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .data import NORMALISATIONS, read_table
from .distributed import DEFAULT_HYPOTHESIS_WINDOWS
from .features import LabelRule


def _say(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


def _hypotheses(args: argparse.Namespace) -> int:
    from .analysis.hypotheses import auto_screen, estimate_cost, labelled_data, rank_hypotheses, search_space, verdict
    from .checkpoint import load_checkpoint
    from .data import detect_columns, prepare_ohlcv

    cluster = args.workers is not None or bool(args.scheduler)
    if cluster:
        from .distributed import check_cluster_args

        check_cluster_args(args.workers, args.scheduler)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.require_config()
    raw = read_table(args.data)
    prep = prepare_ohlcv(raw, detect_columns(raw.columns), repair=args.repair)
    for issue in prep.issues:
        _say(f"{issue.severity}: {issue.message}")
    if not prep.ok:
        raise ValueError(f"{args.data} cannot be used as OHLCV bars (see the errors above).")
    space = search_space(cfg, ckpt.meta, args.window_lengths, args.heads, args.scales)
    rule = LabelRule.from_meta(ckpt.meta)[0]
    if args.horizon is not None or args.threshold is not None:
        rule = LabelRule(
            args.horizon if args.horizon is not None else rule.horizon,
            args.threshold if args.threshold is not None else rule.threshold,
        )
    data = labelled_data(
        prep.frame, ckpt.meta, cfg.state_dim, args.windows, max(space.windows), rule, args.normalisation
    )
    for w in data.warnings:
        _say(f"warning: {w}")
    screen = auto_screen(cfg, space, len(data)) if args.screen == "auto" else int(args.screen)
    cost = estimate_cost(ckpt.state_dict, cfg, space, len(data), screen, args.keep, probe=not cluster)
    _say(
        f"{Path(args.checkpoint).name}: heads {list(space.heads)}, mask off/on, post/pre-norm, LoRA scales "
        f"{[s for s, _ in space.scales]}, window {list(space.windows)}; {len(data):,} labelled windows "
        f"({data.normalisation} normalisation; {rule.describe()})"
    )
    _say((f"screening on {screen} windows, keeping the best {args.keep}; " if screen else "") + cost.text())

    def progress(done: int, total: int, what: str) -> None:
        _say(f"\r[{done / max(total, 1):4.0%}] {what[:90]:<90}", end="")

    def rank(**where: Any) -> Any:
        return rank_hypotheses(
            ckpt.state_dict,
            cfg,
            data,
            space,
            screen=screen,
            keep=args.keep,
            screen_precision=args.screen_precision,
            resamples=args.resamples,
            seed=args.seed,
            **where,
        )

    if cluster:
        from .distributed import ModelRef, cluster_client, hypotheses_scorer, progress_hook, threads_per_worker

        ref = ModelRef.of(args.checkpoint, ckpt.digest, threads_per_worker(args.workers, args.scheduler, args.threads))
        with cluster_client(args.workers, args.scheduler, _say) as client:
            scorer = hypotheses_scorer(
                client, ref, cfg, data, partition_windows=args.partition_windows, on_submit=progress_hook(_say)
            )
            ranking = rank(scorer=scorer)
    else:
        ranking = rank(progress=progress)
    _say(
        f"\ndone in {ranking.seconds:.1f} s; final scores in {ranking.precision}; {ranking.level:.0%} intervals "
        f"from {ranking.resamples} circular block-bootstrap resamples (blocks of {ranking.block_length} windows)"
    )
    _say(verdict(ranking)[1])
    if args.json:
        print(json.dumps(ranking.records(), indent=2))
        return 0
    print(_format(ranking.records()[: args.top] if args.top else ranking.records()))
    return 0


def _format(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'rank':>4} {'heads':>5} {'mask':>7} {'norm':>5} {'scale':>6} {'win':>4}  {'NLL [interval]':<26}"
        f"{'acc':>6} {'F1':>6} {'best':>6}  stage"
    )
    lines = [head]
    for r in records:
        nll = f"{r['nll']:.4f} [{r['nll_interval'][0]:.4f}, {r['nll_interval'][1]:.4f}]"
        lines.append(
            f"{r['rank']:>4} {r['num_heads']:>5} {'causal' if r['causal'] else 'none':>7} "
            f"{'pre' if r['norm_first'] else 'post':>5} {r['lora_scale']:>6g} {r['window']:>4}  {nll:<26}"
            f"{r['accuracy']:>6.3f} {r['f1']:>6.3f} {r['share_best']:>6.1%}  {r['stage']}"
        )
    return "\n".join(lines)


def add_parsers(sub: Any) -> None:
    """Register `hypotheses` on the CLI's subparsers."""
    p = sub.add_parser("hypotheses", help="rank heads x mask x norm placement x LoRA scale by NLL on labelled data")
    p.add_argument("checkpoint")
    p.add_argument("data", help="OHLCV CSV or Parquet; labels by the checkpoint's rule (default: 5 bars, 0.2 %%)")
    p.add_argument("--windows", type=int, default=1024, help="labelled windows, spread evenly over the data")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON, best first")
    p.add_argument(
        "--window-lengths", type=int, nargs="+", help="window lengths to try (default: the stored one, else 64)"
    )
    p.add_argument("--heads", type=int, nargs="+", help="head counts to try (default: divisors of d, head width >= 8)")
    p.add_argument("--scales", type=float, nargs="+", help="LoRA scales to try (default: stored, 0.5, 1, 2, 16/r, ...)")
    p.add_argument("--screen", default="auto", help="windows of a first screening stage, 0 for none (default: auto)")
    p.add_argument("--keep", type=int, default=8, help="combinations kept after screening")
    p.add_argument("--screen-precision", choices=("fast", "exact"), default="fast")
    p.add_argument(
        "--normalisation",
        choices=("auto", *NORMALISATIONS),
        default="auto",
        help="auto: the checkpoint's stored statistics, else z-scores of this data",
    )
    p.add_argument("--horizon", type=int, help="label horizon in bars (default: the checkpoint's rule, else 5)")
    p.add_argument("--threshold", type=float, help="label threshold (default: the checkpoint's rule, else 0.002)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--top", type=int, default=0, help="print only the best N (text output)")
    p.add_argument("--repair", action="store_true", help="repair the data (sort, drop duplicates, fill gaps)")
    p.add_argument("--workers", type=int, help="score on a local Dask cluster of N worker processes")
    p.add_argument("--scheduler", help="score on an existing Dask cluster (e.g. tcp://10.0.0.5:8786)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: its share of the CPUs on a local cluster)",
    )
    p.add_argument(
        "--partition-windows",
        type=int,
        default=DEFAULT_HYPOTHESIS_WINDOWS,
        help="windows per cluster task (rounded up to whole engine batches)",
    )
    p.set_defaults(func=_hypotheses)
