"""Model shapes by scale name.

Dense scales (Llama-style decoders): the name is the non-embedding parameter count of the
`residual` model, within 10% (`tests/test_configs.py` checks it, `scripts/count_params.py` prints it).
Paper scales (DeepSeek-V3-style MoE + MLA, the mHC paper's Table 5; docs/paper_models.md): the name
is the total parameter count; `d_ff` is the first (dense) layer's width, (n_shared + top_k) * d_expert.
"""

# The paper's MLA: 128-dim heads, a 512-dim compressed KV latent, a 64-dim RoPE key.
PAPER_MLA = dict(kv_rank=512, rope_dim=64, head_dim=128)


def paper_scale(d_model, n_layers, n_heads, n_experts, d_expert):
    """A Table 5 model: the first layer dense, 2 shared + top-6 routed experts, untied vocab 129280."""
    return dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, d_ff=8 * d_expert,
                vocab_size=129280, tie_embeddings=False, remat="full", attention="mla", mla=PAPER_MLA,
                moe=dict(n_experts=n_experts, top_k=6, n_shared=2, d_expert=d_expert, first_dense_layers=1))


SCALES = {
    # Tiny, for tests: compiles in seconds on one CPU core.
    "debug": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                  vocab_size=512, tie_embeddings=True, remat="none", attention="mha"),
    # Deep and narrow, like the public 10M HC/mHC reproduction (24 layers, width 192).
    "10m": dict(d_model=192, n_layers=24, n_heads=6, n_kv_heads=6, d_ff=512,
                vocab_size=32768, tie_embeddings=True, remat="none", attention="mha"),
    # GPT-2-small width and depth with a SwiGLU MLP.
    "100m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2560,
                 vocab_size=32768, tie_embeddings=True, remat="full", attention="mha"),
    # TinyLlama-1.1B's shape: 22 layers, width 2048, grouped-query attention with 4 KV heads.
    "1b": dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
               vocab_size=32768, tie_embeddings=False, remat="full", attention="mha"),
    # The paper's architecture in miniature, for tests and a first run: MLA, one dense layer, then
    # two MoE layers of 8 experts (top-2, 1 shared). Trains on one CPU core in about a minute.
    "moe_debug": dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=96, vocab_size=512,
                      tie_embeddings=False, remat="none", attention="mla",
                      mla=dict(kv_rank=32, rope_dim=8, head_dim=16),
                      moe=dict(n_experts=8, top_k=2, n_shared=1, d_expert=32, first_dense_layers=1)),
    "3b": paper_scale(d_model=1280, n_layers=12, n_heads=16, n_experts=64, d_expert=896),
    "9b": paper_scale(d_model=1920, n_layers=18, n_heads=24, n_experts=64, d_expert=1280),
    "27b": paper_scale(d_model=2560, n_layers=30, n_heads=32, n_experts=72, d_expert=1536),
}

# For the dense scales: no experts (every layer a SwiGLU of width d_ff), and MLA dims that apply
# only if attention='mla' is asked for on the command line.
DENSE_MOE = dict(n_experts=0, top_k=0, n_shared=0, d_expert=0, first_dense_layers=0)
