"""Pretraining config: `get_config("<variant>,<scale>")`.

Use it as `--config=configs/pretrain.py:mhc,10m` and override any field as `--config.a.b=value`,
e.g. `--config.model.n_streams=2 --config.model.mhc.sinkhorn_iters=40`.
"""

import ml_collections

from configs.scales import SCALES
from mhc_jax.errors import UserError

# variant -> (model.residual, model.n_streams); 'hc_static' also sets model.hc.dynamic = False.
VARIANTS = {
    "residual": ("residual", 1),
    "hc": ("hc", 4),
    "hc_static": ("hc", 4),
    "mhc": ("mhc", 4),
}


def parse_spec(spec: str) -> tuple[str, str]:
    parts = [p.strip() for p in (spec or "").split(",")]
    if len(parts) != 2:
        raise UserError(
            f"config: expected '<variant>,<scale>' after 'pretrain.py:', got {spec!r} "
            f"(variants: {', '.join(VARIANTS)}; scales: {', '.join(SCALES)})")
    variant, scale = parts
    if variant not in VARIANTS:
        raise UserError(f"config: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if scale not in SCALES:
        raise UserError(f"config: unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return variant, scale


def get_config(spec: str = "mhc,debug") -> ml_collections.ConfigDict:
    variant, scale = parse_spec(spec)
    residual, n_streams = VARIANTS[variant]
    shape = SCALES[scale]

    config = ml_collections.ConfigDict()
    m = config.model = ml_collections.ConfigDict()
    m.residual = residual  # 'residual' (x + F(x)), 'hc' (Hyper-Connections) or 'mhc' (manifold-constrained HC)
    m.n_streams = n_streams  # n: parallel residual streams; 1 for 'residual', the papers use 4
    m.vocab_size = shape["vocab_size"]  # the data's tokenizer overrides it once the data pipeline lands
    m.d_model = shape["d_model"]  # C: width of each stream
    m.n_layers = shape["n_layers"]  # blocks; each has two residual sites (attention, then MLP)
    m.n_heads = shape["n_heads"]  # query heads; head_dim = d_model // n_heads
    m.n_kv_heads = shape["n_kv_heads"]  # key/value heads (< n_heads is grouped-query attention)
    m.d_ff = shape["d_ff"]  # hidden width of the SwiGLU MLP
    m.tie_embeddings = shape["tie_embeddings"]  # unembed with the transposed embedding table
    m.rope_theta = 10_000.0  # RoPE base (the paper's Table 5)
    m.norm_eps = 1e-6  # RMSNorm epsilon, everywhere in the model
    m.dtype = "float32"  # compute dtype of activations ('bfloat16' on GPU/TPU); params stay float32
    m.scan_layers = True  # lax.scan over the stacked blocks: compile time independent of depth
    m.remat = shape["remat"]  # per-block rematerialization: 'none', 'full' (keep only the stream) or 'dots'

    hc = m.hc = ml_collections.ConfigDict()  # Hyper-Connections (Zhu et al. 2024), used when residual='hc'
    hc.dynamic = variant != "hc_static"  # add the input-dependent terms (DHC); False is static HC (SHC)
    hc.use_tanh = True  # squash the dynamic terms with tanh (the paper's default; False = 'w/o tanh')
    hc.scale_init = 0.01  # initial value of the learnable scales s_alpha and s_beta of the dynamic terms
    hc.out_proj_scale = 1.0  # multiplies the init std of attention-out and MLP-down kernels (paper: sqrt(n))

    mhc = m.mhc = ml_collections.ConfigDict()  # manifold-constrained HC (Xie et al. 2025), residual='mhc'
    mhc.alpha_init = 0.01  # initial value of the three gates alpha_pre, alpha_post, alpha_res per site
    mhc.res_init_scale = 4.0  # b_res = s * I: H_res starts near I (diag 0.95 for n=4) yet keeps gradients
    mhc.phi_init_scale = 1.0  # init std of the coefficient projection phi is this times (n * C) ** -0.5
    mhc.sinkhorn_iters = 20  # Sinkhorn-Knopp iterations (T_c then T_r) projecting H_res on the Birkhoff polytope
    mhc.coeff_dtype = "float32"  # dtype of the coefficient path (norm, projection, sigmoid, Sinkhorn)
    mhc.use_pre = True  # False fixes H_pre = 1/n (the paper's Table 1 ablation)
    mhc.use_post = True  # False fixes H_post = 1
    mhc.use_res = True  # False fixes H_res = I
    return config
