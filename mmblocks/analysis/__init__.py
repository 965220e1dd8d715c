"""Analysis of trained encoders and of the LLM blocks in them: what a block does to its tokens (update RMS, Block
Influence, linear CKA), the scale it was trained to receive, which layer to use (`scan_layers`), and where the
tokens' activations sit on the input (activation maps)."""

from .activation_maps import foreground_auc, patch_foreground, plot_activation_maps, token_norm_maps
from .block_scan import plot_layer_scan, rank_layers, scan_layers
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
from .capture import Captured, capture_encoder

__all__ = [
    "CONTROL_TUNES",
    "REFERENCE_TEXT",
    "Captured",
    "block_influence",
    "capture_encoder",
    "control_update_rms",
    "foreground_auc",
    "layer_outputs",
    "linear_cka",
    "patch_foreground",
    "plot_activation_maps",
    "plot_layer_scan",
    "rank_layers",
    "scan_layers",
    "text_hidden_states",
    "text_rms",
    "token_norm_maps",
    "update_rms",
]
