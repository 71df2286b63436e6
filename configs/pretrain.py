"""Pretraining config: `get_config("<variant>,<scale>")`.

Use it as `--config=configs/pretrain.py:mhc,10m` and override any field as `--config.a.b=value`,
e.g. `--config.model.n_streams=2 --config.model.mhc.sinkhorn_iters=40`.
"""

import ml_collections

from configs.scales import DENSE_MOE, PAPER_MLA, SCALES
from mhc_jax.errors import UserError
from mhc_jax.model import residual

# Training defaults by scale: (steps, global batch in sequences, seq_len, peak lr, warmup steps).
TRAINING = {
    "debug": (200, 8, 64, 3e-3, 20),
    "10m": (2000, 32, 256, 3e-3, 200),
    "100m": (20000, 256, 1024, 1e-3, 2000),
    "1b": (50000, 512, 2048, 4e-4, 2000),
    "moe_debug": (200, 8, 64, 3e-3, 20),
    # The mHC paper's Table 5 (its step decay is train.schedule='step'):
    "3b": (30000, 320, 4096, 8.6e-4, 2000),
    "9b": (50000, 512, 4096, 5.9e-4, 2000),
    "27b": (50000, 1280, 4096, 4.0e-4, 2000),
}

def parse_spec(spec: str) -> tuple[str, str]:
    parts = [p.strip() for p in (spec or "").split(",")]
    if len(parts) != 2:
        raise UserError(
            f"config: expected '<variant>,<scale>' after 'pretrain.py:', got {spec!r} "
            f"(variants: {', '.join(residual.VARIANTS)}; scales: {', '.join(SCALES)})")
    variant, scale = parts
    if variant not in residual.VARIANTS:
        raise UserError(f"config: unknown variant {variant!r}; choose one of {', '.join(residual.VARIANTS)}")
    if scale not in SCALES:
        raise UserError(f"config: unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return variant, scale


def get_config(spec: str = "mhc,debug") -> ml_collections.ConfigDict:
    variant, scale = parse_spec(spec)
    residual_kind, n_streams = residual.VARIANTS[variant]
    shape = SCALES[scale]

    config = ml_collections.ConfigDict()
    config.scale = scale  # the scale's name, for tables (scripts/compare.py); its shape is in model.*
    m = config.model = ml_collections.ConfigDict()
    m.residual = residual_kind  # 'residual' (x + F(x)), 'hc' (Hyper-Connections), 'mhc' (manifold-constrained HC), 'mhc_v4', 'mhc_lite', 'kromhc', 'laurel_rw', 'laurel_lr', 'laurel_pa' (mhc_jax/model/residual.py)
    m.n_streams = n_streams  # n: parallel residual streams; 1 for 'residual' and LAuReL's RW and LR, the papers use 4; laurel_pa: the k outputs it mixes
    m.vocab_size = shape["vocab_size"]  # the data's tokenizer overrides it once the data pipeline lands
    m.d_model = shape["d_model"]  # C: width of each stream
    m.n_layers = shape["n_layers"]  # blocks; each has two residual sites (attention, then MLP)
    m.n_heads = shape["n_heads"]  # query heads; with 'mha' head_dim = d_model // n_heads
    m.n_kv_heads = shape["n_kv_heads"]  # 'mha' key/value heads (< n_heads is grouped-query attention)
    m.d_ff = shape["d_ff"]  # hidden width of the dense SwiGLU MLPs (all layers, or the leading dense ones)
    m.attention = shape["attention"]  # 'mha' (multi-head/grouped-query) or 'mla' (multi-head latent attention)
    m.attention_kernel = "auto"  # 'xla' (the reference: float32 [B, H, T, T] scores), 'blockwise' (flash, in JAX), 'cudnn' (GPU) or 'splash' (TPU); 'auto' picks by platform
    m.tie_embeddings = shape["tie_embeddings"]  # unembed with the transposed embedding table
    m.rope_theta = 10_000.0  # RoPE base (the paper's Table 5)
    m.norm_eps = 1e-6  # RMSNorm epsilon, everywhere in the model
    # What imported models need (scripts/import_hf.py); the defaults are the models above.
    m.head_dim = 0  # 'mha' per-head dims; 0 is d_model // n_heads (Qwen3's differ)
    m.qkv_bias = False  # biases on the query, key and value projections (Qwen2)
    m.qk_norm = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    rope = m.rope_scaling = ml_collections.ConfigDict()  # RoPE frequencies for long contexts (layers.Rope)
    rope.kind = "none"  # 'none', 'linear' (all frequencies / factor) or 'llama3' (the low ones / factor, a blend between)
    rope.factor = 1.0  # the context extension factor
    rope.low_freq_factor = 1.0  # llama3: wavelengths above original_max_position / low_freq_factor are scaled
    rope.high_freq_factor = 4.0  # llama3: wavelengths below original_max_position / high_freq_factor are kept
    rope.original_max_position = 8192  # llama3: the context length of pretraining
    m.dtype = "auto"  # compute dtype of activations: 'auto' is bfloat16 on GPU/TPU, float32 on CPU; params stay float32
    m.scan_layers = True  # lax.scan over the stacked blocks: compile time independent of depth
    m.remat = shape["remat"]  # per-block rematerialization: 'none', 'full' (keep the stream and the HC/mHC coefficients) or 'dots'
    m.site_impl = "fast"  # HC/mHC coefficients: 'fast' (RMS factor after the projection, Sinkhorn recomputed in backward) or 'reference' (the plain math, for checks)

    mla = m.mla = ml_collections.ConfigDict()  # multi-head latent attention (DeepSeek-V2/V3), attention='mla'
    mla_shape = shape.get("mla", PAPER_MLA)
    mla.kv_rank = mla_shape["kv_rank"]  # width of the compressed KV latent (RMS-normalized; cached when decoding)
    mla.rope_dim = mla_shape["rope_dim"]  # dims of the RoPE query part and of the RoPE key that all heads share
    mla.head_dim = mla_shape["head_dim"]  # per-head dims of the no-RoPE query/key part and of the values

    moe = m.moe = ml_collections.ConfigDict()  # DeepSeekMoE FFNs with V3 routing (mhc_jax/model/moe.py)
    moe_shape = shape.get("moe", DENSE_MOE)
    moe.n_experts = moe_shape["n_experts"]  # routed experts per MoE layer; 0 makes every layer dense
    moe.top_k = moe_shape["top_k"]  # routed experts per token, chosen on sigmoid affinity + router bias
    moe.n_shared = moe_shape["n_shared"]  # shared experts every token passes through
    moe.d_expert = moe_shape["d_expert"]  # hidden width of each expert's SwiGLU
    moe.first_dense_layers = moe_shape["first_dense_layers"]  # leading layers with a dense MLP of width d_ff
    moe.routed_scale = 1.0  # multiplies the renormalized gates of the routed experts (V3's routed scaling factor)
    moe.dispatch = "dropless"  # 'dropless' (every assignment, sorted by expert into grouped matmuls) or 'capacity' (per-sequence capacity, drops the rest)
    moe.exchange = "auto"  # dropless with experts split over mesh.expert: how rows reach their experts' devices: 'ragged_all_to_all' (TPU/GPU), 'all_gather' (the same exchange from all_gather, runs anywhere); auto: the first where it runs
    moe.grouped_matmul = "auto"  # dropless: 'ragged_dot' (jax.lax.ragged_dot) or 'megablox' (ragged_dot with megablox's tgmm kernel for the weight gradient, TPU only); auto: megablox on TPU
    moe.capacity_factor = 1.25  # dispatch='capacity' only: per-sequence expert capacity ceil(f * T * top_k / n_experts); <= 0: capacity T
    moe.bias_update_rate = 1e-3  # gamma: after each step bias_i += gamma * sign(mean load - load_i) (V3: 0.001)
    moe.balance_loss_weight = 0.0  # weight of V3's complementary sequence-wise balance loss; 0: off

    hc = m.hc = ml_collections.ConfigDict()  # Hyper-Connections (Zhu et al. 2024), used when residual='hc'
    hc.dynamic = variant != "hc_static"  # add the input-dependent terms (DHC); False is static HC (SHC)
    hc.use_tanh = True  # squash the dynamic terms with tanh (the paper's default; False = 'w/o tanh')
    hc.scale_init = 0.01  # initial value of the learnable scales s_alpha and s_beta of the dynamic terms
    hc.out_proj_scale = 1.0  # multiplies the init std of attention-out and MLP-down kernels (paper: sqrt(n))
    hc.static_res_weight_decay = False  # AdamW's weight decay also on the static H_res (A_r), as one public HC run had it

    mhc = m.mhc = ml_collections.ConfigDict()  # manifold-constrained HC (Xie et al. 2025): residual='mhc', 'mhc_v4', 'mhc_lite', 'kromhc'
    mhc.alpha_init = 0.01  # initial value of the three gates alpha_pre, alpha_post, alpha_res per site
    mhc.res_init_scale = 4.0  # the identity's lead in the static res logits: mhc b_res = s * I (H_res diag 0.95 for n=4); mhc_lite: s on the identity permutation; kromhc: s on each factor's identity
    mhc.phi_init_scale = 1.0  # init std of the coefficient projection phi is this times (n * C) ** -0.5
    mhc.sinkhorn_iters = 20  # Sinkhorn-Knopp iterations (T_c then T_r) projecting H_res on the Birkhoff polytope
    mhc.coeff_dtype = "float32"  # dtype of the coefficient path (norm, projection, sigmoid, Sinkhorn)
    mhc.v4_eps = 1e-6  # mhc_v4: DeepSeek-V4's hc_eps, added to H_pre, the head's weights and every Sinkhorn division
    mhc.use_pre = True  # False fixes H_pre = 1/n (the paper's Table 1 ablation)
    mhc.use_post = True  # False fixes H_post = 1
    mhc.use_res = True  # False fixes H_res = I

    laurel = m.laurel = ml_collections.ConfigDict()  # LAuReL (Menghani et al. 2025): residual='laurel_rw', 'laurel_lr', 'laurel_pa'
    laurel.rank = 16  # laurel_lr: rank r of the skip's low-rank term B A (the paper: 32-64 for LLMs, 4 at 1B)

    steps, batch_size, seq_len, lr, warmup_steps = TRAINING[scale]
    t = config.train = ml_collections.ConfigDict()
    t.steps = steps  # horizon of the schedule; a resumed run keeps it
    t.batch_size = batch_size  # global batch in sequences, over all processes and microbatches
    t.seq_len = seq_len  # tokens per sequence (the model sees seq_len, predicts the next seq_len)
    t.microbatches = 1  # gradient accumulation: the batch is split into this many sequential parts
    t.loss_chunk = 1024  # positions whose logits the loss makes at once (recomputed in backward); 0: all
    t.lr = lr  # peak learning rate
    t.schedule = "step"  # 'step' (the paper's: x0.316 at 80%, x0.1 at 90% of steps), 'cosine' or 'wsd'
    t.warmup_steps = warmup_steps  # linear warmup, for every schedule
    t.min_lr_ratio = 0.1  # 'cosine' and 'wsd' end at this fraction of lr
    t.decay_fraction = 0.2  # 'wsd' decays over this last fraction of the steps
    t.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms, gates, static HC/mHC parameters)
    t.b1 = 0.9  # AdamW beta1
    t.b2 = 0.95  # AdamW beta2
    t.eps = 1e-8  # AdamW epsilon
    t.grad_clip = 1.0  # clip the global gradient norm to this
    t.site_lr_scale = 1.0  # the HC/mHC site parameters learn at lr x this (0 freezes them; after surgery, see --init_from)
    t.site_warmup_steps = 0  # and, if > 0, ramp linearly from 0 over these first steps
    t.seed = 0  # parameter init and data order
    t.log_every = 10  # steps between lines of metrics.jsonl
    t.eval_every = 200  # steps between validation losses (and at the end)
    t.eval_batches = 8  # validation batches per evaluation (0: the whole split)
    t.diag_every = 50  # steps between Amax gain / stream RMS diagnostics
    t.checkpoint_every = 500  # steps between checkpoints (and at the end, and on SIGTERM/SIGINT)
    t.keep_checkpoints = 3  # the newest this many are kept
    t.stop_at_step = 0  # if > 0, save and stop once this step is reached (the schedule still spans steps)

    mesh = config.mesh = ml_collections.ConfigDict()  # data x fsdp x expert x tensor must be the device count
    mesh.data = 1  # pure data parallelism (replicated parameters)
    mesh.fsdp = -1  # fully sharded data parallelism; -1 takes the devices the others leave
    mesh.expert = 1  # expert parallelism: routed experts split over it (it must divide moe.n_experts); data-parallel elsewhere
    mesh.tensor = 1  # tensor parallelism over heads, MLP width and vocabulary
    mesh.max_replicated = 0.02  # with fsdp > 1, fail if more than this share of parameter bytes is replicated

    config.data = ml_collections.ConfigDict()  # where the training and validation tokens come from
    config.data.dir = "data/default"  # from scripts/prepare_data.py; data/default is prepared on first use
    config.data.mixture = ""  # train on 'FOLDER:WEIGHT,...' (same tokenizer as data.dir, which still gives the validation split)

    log = config.log = ml_collections.ConfigDict()
    log.progress = True  # a progress bar with loss, tokens/s and ETA (process 0)
    log.tensorboard = True  # TensorBoard event files in WORKDIR/tensorboard, the scalars of metrics.jsonl
    log.wandb = False  # also log to Weights & Biases
    log.wandb_mode = "offline"  # 'offline' needs no network (sync later with `wandb sync`); or 'online'
    log.wandb_project = "mhc-jax"  # the W&B project
    log.wandb_group = ""  # W&B group of the run; scripts/sweep.py gives a sweep's runs one group
    log.peak_tflops = 0.0  # per-device peak for MFU; 0 looks the device up in mhc_jax/training/flops.py
    return config
