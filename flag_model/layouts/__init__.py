"""Checkpoint layouts: which family a file is, how its keys differ from a target, fixes, conversions, exports.

Cut by responsibility: `keys` (shapes, patterns, prefixes), `families` (one module per known family: signature,
size inference, expected keys, words), `recognize` (ranking every family on a file), `diff`, `fixes`,
`explain` (a table of rules) and `convert` (strict load, native/merged/stock export).
"""
from .convert import ALIASES as TARGET_ALIASES
from .convert import (EXPORT_FORMATS, EXPORT_KINDS, FAMILY_ASSUMPTIONS, TARGETS, ReloadCheck, StockFlagTrader,
                      StrictLoad, convert, export_bytes, export_config, export_file, export_plan, export_problem,
                      family_assumptions, infer_sizes, native_layout, reconstruction_config, reconstruction_shapes,
                      resize_config, stock_layout, stock_reload_check, stock_snippet, strict_load, target_shapes,
                      to_native, with_sizes)
from .diff import KeyDiff, diff_keys, diff_table
from .explain import RULES, Explanation, explain
from .families import FAMILIES, Family, LayoutSize
from .fixes import (Fix, apply_fix, apply_fixes, candidate_fixes, drop_keys, fix_for_target, make_fix, merge_lora,
                    suggest_fixes)
from .keys import KNOWN_PREFIXES, LayoutError, Shape, key_pattern, meta_like, natural_key, shapes_of, strip_prefixes
from .recognize import (FamilyMatch, Recognition, lora_scale_for, rank_layouts, ranking_headline, recognise,
                        recognise_checkpoint)

LAYOUTS = FAMILIES  # the older name of the registry

__all__ = [
    "EXPORT_FORMATS", "EXPORT_KINDS", "Explanation", "FAMILIES", "FAMILY_ASSUMPTIONS", "Family", "FamilyMatch", "Fix",
    "KNOWN_PREFIXES", "KeyDiff", "LAYOUTS", "LayoutError", "LayoutSize", "RULES", "Recognition",
    "TARGET_ALIASES", "ReloadCheck",
    "Shape", "StockFlagTrader", "StrictLoad", "TARGETS", "apply_fix", "apply_fixes", "candidate_fixes", "convert",
    "diff_keys", "diff_table", "drop_keys", "explain", "export_bytes", "export_config", "export_file", "export_plan",
    "export_problem", "family_assumptions", "fix_for_target", "infer_sizes", "key_pattern", "lora_scale_for",
    "make_fix", "merge_lora", "meta_like", "native_layout", "natural_key", "rank_layouts", "ranking_headline",
    "recognise", "recognise_checkpoint", "reconstruction_config", "reconstruction_shapes", "resize_config",
    "shapes_of", "stock_layout", "stock_reload_check", "stock_snippet", "strict_load", "strip_prefixes",
    "suggest_fixes", "target_shapes", "to_native", "with_sizes",
]
