"""What every config field accepts: one rule per field and the relations between fields.

`configs/pretrain.py` holds the defaults and what each field means; this table holds what each
may be. `validate` checks a whole config before anything is written (cli.load_config); a field
without a rule fails tests/test_configs.py, which tries a bad value of every field.
"""

import ml_collections

from mhc_jax import validation
from mhc_jax.data import pipeline
from mhc_jax.model import attention, attention_kernels, layers, moe, residual, transformer
from mhc_jax.training import optim
from mhc_jax.validation import FLAG, Choice, Number, Relation, Text

# Model fields that change how the model compiles, not what it computes: a run resumes across them,
# and surgery (--init_from) takes them from the run's config rather than the source's.
COMPILE_ONLY_FIELDS = ("dtype", "remat", "scan_layers", "site_impl", "attention_kernel", "moe.dispatch", "moe.exchange",
                       "moe.grouped_matmul", "moe.capacity_factor")
COUNT, SIZE = Number(int, 0), Number(int, 1)  # >= 0, >= 1
POSITIVE, NON_NEGATIVE, ANY = Number(float, 0, above=True), Number(float, 0), Number(float)
FRACTION = Number(float, 0, 1)
MESH_AXIS = Number(int, 1, special=(-1,))
FIELD_RULES = {
    "scale": Text(),  # the name get_config was given; configs/scales.py holds the shapes
    "model.residual": Choice(tuple(residual.SITES)), "model.n_streams": SIZE,
    "model.vocab_size": SIZE, "model.d_model": SIZE, "model.n_layers": SIZE, "model.n_heads": SIZE,
    "model.n_kv_heads": SIZE, "model.d_ff": SIZE, "model.attention": Choice(attention.KINDS),
    "model.attention_kernel": Choice(attention_kernels.KERNELS),
    "model.tie_embeddings": FLAG, "model.rope_theta": POSITIVE, "model.norm_eps": POSITIVE,
    "model.head_dim": COUNT, "model.qkv_bias": FLAG, "model.qk_norm": FLAG,
    "model.rope_scaling.kind": Choice(layers.ROPE_SCALINGS), "model.rope_scaling.factor": POSITIVE,
    "model.rope_scaling.low_freq_factor": POSITIVE, "model.rope_scaling.high_freq_factor": POSITIVE,
    "model.rope_scaling.original_max_position": SIZE,
    "model.dtype": Choice(transformer.DTYPES), "model.scan_layers": FLAG, "model.remat": Choice(tuple(transformer.REMAT_POLICIES)),
    "model.site_impl": Choice(residual.IMPLEMENTATIONS),
    "model.mla.kv_rank": SIZE, "model.mla.rope_dim": SIZE, "model.mla.head_dim": SIZE,
    "model.moe.n_experts": COUNT, "model.moe.top_k": COUNT, "model.moe.n_shared": COUNT, "model.moe.d_expert": COUNT,
    "model.moe.first_dense_layers": COUNT, "model.moe.routed_scale": POSITIVE, "model.moe.capacity_factor": ANY,
    "model.moe.dispatch": Choice(moe.DISPATCHES),
    "model.moe.exchange": Choice(moe.EXCHANGES),
    "model.moe.grouped_matmul": Choice(("auto", *moe.GROUPED_MATMULS)),
    "model.moe.bias_update_rate": NON_NEGATIVE, "model.moe.balance_loss_weight": NON_NEGATIVE,
    "model.hc.dynamic": FLAG, "model.hc.use_tanh": FLAG, "model.hc.scale_init": ANY, "model.hc.out_proj_scale": POSITIVE,
    "model.hc.static_res_weight_decay": FLAG,
    "model.mhc.alpha_init": ANY, "model.mhc.res_init_scale": ANY, "model.mhc.phi_init_scale": NON_NEGATIVE,
    "model.mhc.sinkhorn_iters": SIZE, "model.mhc.coeff_dtype": Choice(residual.COEFF_DTYPES),
    "model.mhc.use_pre": FLAG, "model.mhc.use_post": FLAG, "model.mhc.use_res": FLAG, "model.mhc.v4_eps": NON_NEGATIVE,
    "model.laurel.rank": SIZE,
    "train.steps": SIZE, "train.batch_size": SIZE, "train.seq_len": SIZE, "train.microbatches": SIZE, "train.loss_chunk": COUNT,
    "train.lr": POSITIVE, "train.schedule": Choice(optim.SCHEDULES), "train.warmup_steps": COUNT,
    "train.min_lr_ratio": FRACTION, "train.decay_fraction": Number(float, 0, 1, above=True),
    "train.weight_decay": NON_NEGATIVE, "train.b1": Number(float, 0, 1, below=True),
    "train.b2": Number(float, 0, 1, below=True), "train.eps": POSITIVE, "train.grad_clip": POSITIVE,
    "train.site_lr_scale": NON_NEGATIVE, "train.site_warmup_steps": COUNT,
    "train.seed": COUNT, "train.log_every": SIZE, "train.eval_every": SIZE, "train.eval_batches": COUNT,
    "train.diag_every": SIZE, "train.checkpoint_every": SIZE, "train.keep_checkpoints": SIZE, "train.stop_at_step": COUNT,
    "mesh.data": MESH_AXIS, "mesh.fsdp": MESH_AXIS, "mesh.expert": MESH_AXIS, "mesh.tensor": MESH_AXIS,
    "mesh.max_replicated": FRACTION,
    "data.dir": Text(), "data.mixture": Text(empty=True),
    "log.progress": FLAG, "log.tensorboard": FLAG, "log.wandb": FLAG, "log.wandb_mode": Choice(("offline", "online", "disabled")),
    "log.wandb_project": Text(), "log.wandb_group": Text(empty=True), "log.peak_tflops": NON_NEGATIVE,
}

RELATIONS = (
    Relation("model.n_streams", lambda c: residual.stream_count_problem(c.model) is None,
             lambda c: residual.stream_count_problem(c.model)),
    Relation("model.laurel.rank", lambda c: residual.rank_problem(c.model) is None,
             lambda c: residual.rank_problem(c.model)),
    Relation("model.d_model", lambda c: c.model.attention != "mha" or c.model.head_dim
             or c.model.d_model % c.model.n_heads == 0,
             "must be divisible by model.n_heads = {c.model.n_heads} (or set model.head_dim)"),
    Relation("model.head_dim", lambda c: c.model.attention != "mha" or attention.head_dim(c.model) % 2 == 0,
             "head_dim (d_model // n_heads where model.head_dim is 0) must be even for RoPE"),
    Relation("model.rope_scaling.high_freq_factor", lambda c: c.model.rope_scaling.kind != "llama3"
             or c.model.rope_scaling.high_freq_factor > c.model.rope_scaling.low_freq_factor,
             "must be above model.rope_scaling.low_freq_factor for 'llama3'"),
    Relation("model.n_kv_heads", lambda c: c.model.attention != "mha" or c.model.n_heads % c.model.n_kv_heads == 0,
             "must divide model.n_heads = {c.model.n_heads}"),
    Relation("model.mla.rope_dim", lambda c: c.model.attention != "mla" or c.model.mla.rope_dim % 2 == 0,
             "must be even for RoPE"),
    Relation("model.attention_kernel", lambda c: c.model.attention_kernel != "cudnn" or
             c.model.dtype in ("auto", "bfloat16", "float16"),
             "'cudnn' computes in bfloat16 or float16; set model.dtype to one of them (or 'auto'), or use 'blockwise'"),
    Relation("model.moe.top_k", lambda c: not c.model.moe.n_experts or 1 <= c.model.moe.top_k <= c.model.moe.n_experts,
             "must be between 1 and model.moe.n_experts = {c.model.moe.n_experts}"),
    Relation("model.moe.d_expert", lambda c: not c.model.moe.n_experts or c.model.moe.d_expert >= 1,
             "must be >= 1 in an MoE model (model.moe.n_experts > 0)"),
    Relation("model.moe.first_dense_layers",
             lambda c: not c.model.moe.n_experts or c.model.moe.first_dense_layers < c.model.n_layers,
             "must be < model.n_layers = {c.model.n_layers} in an MoE model (n_experts = 0 makes it dense)"),
    Relation("mesh.expert", lambda c: not c.model.moe.n_experts or c.mesh.expert == -1
             or c.model.moe.n_experts % c.mesh.expert == 0,
             "must divide model.moe.n_experts = {c.model.moe.n_experts} (each device holds n_experts / expert experts)"),
    Relation("data.mixture", lambda c: pipeline.parse_mixture(c.data.mixture)[1] is None,
             lambda c: pipeline.parse_mixture(c.data.mixture)[1]),
    Relation("train.stop_at_step", lambda c: c.train.stop_at_step <= c.train.steps,
             "must be <= train.steps = {c.train.steps} (0: run to train.steps)"),
    Relation("train.microbatches", lambda c: c.train.batch_size % c.train.microbatches == 0,
             "must divide train.batch_size = {c.train.batch_size}"),
    Relation("mesh.fsdp", lambda c: [c.mesh[axis] for axis in ("data", "fsdp", "expert", "tensor")].count(-1) <= 1,
             "at most one mesh axis may be -1 (it takes the devices the others leave)"),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first field of `config` that breaks FIELD_RULES or RELATIONS."""
    validation.check(config, FIELD_RULES, RELATIONS)
