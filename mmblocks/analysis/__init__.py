"""Analysis of trained encoders and of the LLM blocks in them: what a block does to its tokens (update RMS, Block
Influence, linear CKA) and the scale it was trained to receive."""

from .block_similarity import (
    CONTROL_TUNES,
    REFERENCE_TEXT,
    block_influence,
    control_update_rms,
    layer_outputs,
    linear_cka,
    text_hidden_states,
    text_rms,
    update_rms,
)

__all__ = [
    "CONTROL_TUNES",
    "REFERENCE_TEXT",
    "block_influence",
    "control_update_rms",
    "layer_outputs",
    "linear_cka",
    "text_hidden_states",
    "text_rms",
    "update_rms",
]
