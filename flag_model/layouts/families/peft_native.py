"""FLAG-TRADER wrapped by HF PEFT (get_peft_model(...).state_dict()): base_layer, A [r, in], B [out, r]."""

from ._flag import PEFT, expected, infer
from .base import Family

FAMILY = Family(
    name="peft",
    title="PEFT-wrapped FLAG-TRADER",
    description="the same model wrapped by HF PEFT: a `base_model.model.` prefix, `base_layer`, lora_A.weight "
    "[r, in] and lora_B.weight [out, r] — the native matrices transposed",
    converts_to="native FLAG-TRADER (strip the prefix, base_layer → base, transpose A and B)",
    convertible=True,
    carries_lora=True,
    signature=(
        r"transformer_blocks\.\d+\.attention\.(q|k|v|out)_proj\.base_layer\.weight$",
        r"transformer_blocks\.\d+\.[\w.]+\.lora_A(\.[^.]+)?\.weight$",
    ),
    infer=lambda shapes, stored: infer(PEFT, shapes, stored),
    expected=lambda size: expected(PEFT, size),
)
