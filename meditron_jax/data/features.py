"""The batch the model trains on: T5X's decoder feature names (no TensorFlow import, so train/ can use it)."""

BATCH_KEYS = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)
REQUIRED_KEYS = ("decoder_input_tokens", "decoder_target_tokens")
