"""The hand-written 'Option 2' sketch of the analysis document (CustomDecisionTransformerLoRA): LoRA directly on
the block's projections (`transformer_blocks.N.q_proj.lora_A`), no `attention.`/`lora.` levels, pre-norm forward,
`base(x) + x @ A @ B` (scale 1)."""

from ._flag import SKETCH, expected, infer
from .base import Family

FAMILY = Family(
    name="sketch",
    title="hand-written sketch (Option 2)",
    description="the analysis document's sketch: q/k/v/out_proj and ffn LoRALayers directly on the block "
    "(transformer_blocks.N.q_proj.lora_A [in, r]), no attention./lora. levels; its forward is "
    "pre-norm and adds x @ A @ B unscaled",
    converts_to="native FLAG-TRADER (add the attention. and lora. levels) with norm placement pre-norm and "
    "LoRA scale 1, as the sketch's forward does",
    convertible=True,
    carries_lora=True,
    signature=(
        r"transformer_blocks\.\d+\.(q|k|v|out)_proj\.(lora_A|base\.weight)$",
        r"transformer_blocks\.\d+\.ffn\.[03]\.lora_A$",
    ),
    infer=lambda shapes, stored: infer(SKETCH, shapes, stored),
    expected=lambda size: expected(SKETCH, size),
)
