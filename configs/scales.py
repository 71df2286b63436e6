"""Model shapes by scale name.

A scale's name is the non-embedding parameter count of its `residual` model (within 10%;
`tests/test_configs.py` checks it, `scripts/count_params.py` prints it). Dense Llama-style decoders.
"""

SCALES = {
    # Tiny, for tests: compiles in seconds on one CPU core.
    "debug": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                  vocab_size=512, tie_embeddings=True, remat="none"),
    # Deep and narrow, like the public 10M HC/mHC reproduction (24 layers, width 192).
    "10m": dict(d_model=192, n_layers=24, n_heads=6, n_kv_heads=6, d_ff=512,
                vocab_size=32768, tie_embeddings=True, remat="none"),
    # GPT-2-small width and depth with a SwiGLU MLP.
    "100m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2560,
                 vocab_size=32768, tie_embeddings=True, remat="full"),
    # TinyLlama-1.1B's shape: 22 layers, width 2048, grouped-query attention with 4 KV heads.
    "1b": dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
               vocab_size=32768, tie_embeddings=False, remat="full"),
}
