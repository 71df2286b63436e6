"""AdamW with global-norm clipping, the learning-rate schedules, and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from mhc_jax.model.transformer import SITE_ATTRIBUTES

SCHEDULES = ("step", "cosine", "wsd")


@struct.dataclass
class Hyperparameters:
    """The numbers of config.train that the training step takes as inputs instead of compiling in
    as constants: runs that differ only in them (another learning rate, a longer run, the stability
    study's stress runs) share one compiled step, and JAX's compilation cache hits across them.
    Whatever decides the optimizer state's structure (site_lr_scale != 1 or a site warmup) is read
    from the config itself (`make_optimizer`)."""
    lr: jax.Array
    steps: jax.Array
    warmup_steps: jax.Array
    min_lr_ratio: jax.Array
    decay_fraction: jax.Array
    weight_decay: jax.Array
    grad_clip: jax.Array
    site_lr_scale: jax.Array
    site_warmup_steps: jax.Array
    schedule: str = struct.field(pytree_node=False)

    @classmethod
    def of(cls, train_config) -> "Hyperparameters":
        numbers = {name: np.float32(train_config[name]) for name in cls.__dataclass_fields__ if name != "schedule"}
        return cls(**numbers, schedule=train_config.schedule)


def learning_rate(step, train_config):
    """The learning rate used by the update at `step` (0-based). Every schedule warms up linearly
    over `warmup_steps` (the first update already moves), then:
      step    the mHC/DeepSeek paper's: lr until 80% of `steps`, 0.316 lr until 90%, then 0.1 lr
      cosine  cosine from lr down to min_lr_ratio * lr at `steps`
      wsd     warmup-stable-decay: lr until the last decay_fraction of `steps`, then linear to
              min_lr_ratio * lr
    """
    c = train_config
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(1.0, (step + 1) / jnp.maximum(c.warmup_steps, 1))
    if c.schedule == "step":
        after = jnp.where(step < 0.8 * c.steps, 1.0, jnp.where(step < 0.9 * c.steps, 0.316, 0.1))
    elif c.schedule == "cosine":
        progress = jnp.clip((step - c.warmup_steps) / jnp.maximum(c.steps - c.warmup_steps, 1), 0.0, 1.0)
        after = c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    else:
        decay_start = c.steps * (1 - c.decay_fraction)
        progress = jnp.clip((step - decay_start) / jnp.maximum(c.steps - decay_start, 1), 0.0, 1.0)
        after = 1.0 - (1 - c.min_lr_ratio) * progress
    return c.lr * jnp.where(step < c.warmup_steps, warmup, after)


def weight_decay_mask(abstract_params: nnx.State):
    """True for the parameters AdamW decays, from each parameter's `weight_decay` flag (layers.param)."""
    mask = jax.tree.map(lambda v: v.get_metadata()["weight_decay"], abstract_params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(mask)


def site_mask(abstract_params: nnx.State):
    """True for the parameters of the HC/mHC sites (residual.py's modules)."""
    return nnx.to_pure_dict(jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(key, "key", None) in SITE_ATTRIBUTES for key in path), abstract_params,
        is_leaf=lambda x: isinstance(x, nnx.Variable)))


def site_scale(step, train_config):
    """What the site parameters' updates are multiplied by at `step`: site_lr_scale, ramped up from
    0 over site_warmup_steps."""
    c = train_config
    ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1) / jnp.maximum(c.site_warmup_steps, 1))
    return c.site_lr_scale * jnp.where(c.site_warmup_steps > 0, ramp, 1.0)


def make_optimizer(train_config, decay_mask, sites, hyper: Hyperparameters | None = None) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; the site parameters' updates scaled by `site_scale` where
    that is not 1 (an optimizer state of the same structure as before otherwise). The numbers come
    from `hyper` (traced inside the step) or else from the config."""
    c, h = train_config, hyper or train_config
    parts = [optax.clip_by_global_norm(h.grad_clip),
             optax.adamw(lambda count: learning_rate(count, h), b1=c.b1, b2=c.b2, eps=c.eps,
                         weight_decay=h.weight_decay, mask=decay_mask)]
    if c.site_lr_scale != 1.0 or c.site_warmup_steps:
        parts.append(optax.masked(optax.scale_by_schedule(lambda count: site_scale(count, h)), sites))
    return optax.chain(*parts)
