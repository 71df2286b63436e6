"""Perplexity on the validation split of the data the model was trained on.

The split's token stream is cut into the training windows (train.seq_len + 1 tokens, each
predicting seq_len); the loss is the mean negative log-likelihood in nats per token, and bits per
byte converts it with the split's own token and byte counts: loss / ln 2 x tokens / bytes, which
compares across tokenizers.
"""

import math

from mhc_jax.data import pipeline
from mhc_jax.errors import UserError


def run(model, data_dir, limit: int | None) -> dict:
    del data_dir  # the training data, named by the checkpoint, not the benchmark folder
    train_data = model.config.data.dir
    manifest = pipeline.load_manifest(train_data)
    if manifest["tokenizer"]["sha256"] != model.tokenizer_sha256:
        raise UserError(f"data dir {train_data}: its tokenizer is not the one the checkpoint was trained with")
    seq_len = model.config.train.seq_len
    windows = pipeline.TokenWindows(train_data, manifest, "validation", seq_len)
    count = len(windows) if limit is None else min(limit, len(windows))
    scores = model.score_tokens([(list(windows[i]), seq_len) for i in range(count)], desc=f"perplexity ({count})")
    loss = -sum(logprob for logprob, _ in scores) / (count * seq_len)
    split = manifest["splits"]["validation"]
    metrics = {"loss": loss, "perplexity": math.exp(loss),
               "bits_per_byte": loss / math.log(2) * split["tokens"] / split["bytes"]}
    return {"metrics": metrics, "primary": "bits_per_byte", "n": count, "subtasks": {}, "samples": [],
            "protocol": f"validation split of {train_data}, {count} windows of {seq_len} predicted tokens; "
                        "loss in nats/token, bits per byte via the split's tokens/bytes"}
