"""Writes tests/data/deepseek_v4/reference.npz: DeepSeek-V4's hyper-connections run by the reference
implementation (transformers 5.x, models/deepseek_v4) on a tiny random configuration, so that the
suite checks residual.py's `mhc_v4` against it without torch or transformers.

Needs both, in an environment of its own (they are not project dependencies); with a CPU torch:

    python3 -m venv /tmp/hf-reference
    /tmp/hf-reference/bin/pip install torch transformers
    /tmp/hf-reference/bin/python scripts/make_v4_reference.py

One site and the final collapse, as DeepseekV4DecoderLayer and DeepseekV4Model apply them:
DeepseekV4HyperConnection gives (post, comb, collapsed) of the streams x; a stand-in branch
y = tanh(collapsed @ branch) replaces attention; the layer's update post * y + comb^T x; then
DeepseekV4HyperHead collapses the streams. The file holds every input and weight (random, wider
than an init so that no map is near a special point), those outputs, and the gradients of
sum(head output * probe) with respect to the weights and x.
"""

from pathlib import Path

import numpy as np
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "deepseek_v4" / "reference.npz"
STREAMS, WIDTH, ITERS, BATCH, TOKENS = 4, 16, 20, 2, 3


def main() -> None:
    torch.manual_seed(0)
    config = DeepseekV4Config(hidden_size=WIDTH, hc_mult=STREAMS, hc_sinkhorn_iters=ITERS, hc_eps=1e-6,
                              rms_norm_eps=1e-6)
    site = v4.DeepseekV4HyperConnection(config).float()
    head = v4.DeepseekV4HyperHead(config).float()
    with torch.no_grad():
        for weight in (site.fn, site.base, head.hc_fn, head.hc_base):
            weight.normal_(0.0, 1.0)
        site.scale.uniform_(0.5, 1.5)
        head.hc_scale.uniform_(0.5, 1.5)
    x = torch.randn(BATCH, TOKENS, STREAMS, WIDTH, requires_grad=True)
    branch = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
    probe = torch.randn(BATCH, TOKENS, WIDTH)

    post, comb, collapsed = site(x)
    y = torch.tanh(collapsed @ branch)
    streams = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)  # DecoderLayer's update
    final = head(streams)
    (final * probe).sum().backward()

    tensors = {"x": x, "branch": branch, "probe": probe, "fn": site.fn, "base": site.base, "scale": site.scale,
               "head_fn": head.hc_fn, "head_base": head.hc_base, "head_scale": head.hc_scale,
               "post": post, "comb": comb, "collapsed": collapsed, "streams": streams, "final": final}
    arrays = {name: t.detach().numpy().astype(np.float32) for name, t in tensors.items()}
    for name in ("x", "fn", "base", "scale", "head_fn", "head_base", "head_scale"):
        arrays[f"grad_{name}"] = tensors[name].grad.numpy().astype(np.float32)
    arrays["iters"], arrays["eps"] = np.int32(ITERS), np.float32(1e-6)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
