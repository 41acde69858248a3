"""Tiny random tower configurations shared by the tests (built locally; nothing is downloaded)."""

# HuBERT/wav2vec2-shaped speech tower: 3 layers of width 32; 80 samples per frame (200 frames/s at 16 kHz).
TINY_SPEECH = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_stride=(5, 4, 4),
    conv_kernel=(10, 4, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
