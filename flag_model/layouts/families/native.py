"""FLAG-TRADER in its own layout (DESIGN §2): what the reconstruction loads strictly."""

from ._flag import NATIVE, expected, infer
from .base import Family

FAMILY = Family(
    name="native",
    title="FLAG-TRADER LoRA",
    description="the FLAG-TRADER decision transformer as its training code saved it: separate q/k/v/out "
    "projections, LoRA A [in, r] / B [r, out] in a `lora.` sub-module, post-norm blocks",
    converts_to="itself (loads strictly into the reconstruction); export merged or stock PyTorch",
    convertible=True,
    carries_lora=True,
    signature=(
        r"transformer_blocks\.\d+\.attention\.(q|k|v|out)_proj\.base\.weight$",
        r"\.lora\.lora_A$",
        r"(^|\.)state_embedding\.weight$",
        r"transformer_blocks\.\d+\.ffn\.[03]\.base\.weight$",
    ),
    infer=lambda shapes, stored: infer(NATIVE, shapes, stored),
    expected=lambda size: expected(NATIVE, size),
)
