"""How long evaluating a config takes on a slice, before any checkpoint exists (scripts/dry_run.py
--eval): BBH, DROP, GSM8K and MMLU, whole.

The model is laid out as eval.py lays it (evals/serving.py: the default mesh for the slice, weights
in the compute dtype) and its scoring step and decoding prefill are compiled for the slice; XLA's
memory analysis of them gives the rows per batch that fit a device (--batch_size=auto's rule) and
the KV cache that each decoding step reads. Token counts come from an evenly spaced sample of each
benchmark's prompts, tokenized with the config's data tokenizer (config.data.dir), as eval.py
encodes them (the answers of a question share their context's pass). Then, at a stated utilisation u
of the slice:

- scoring and prefill: forward FLOPs (training/flops.py's forward pass at each sequence's padded
  width) / (devices x peak x u);
- each decoding step: the larger of its FLOPs / (devices x peak x u) and the bytes it reads per
  device (parameters and the KV cache) / (HBM bandwidth x u). Every batch decodes the task's whole
  token budget: no early stop, the time of a model that never meets a stop sequence.
"""

import math
from pathlib import Path

import ml_collections

from mhc_jax import sharding
from mhc_jax.data import pipeline
from mhc_jax.evals import eval_data, serving
from mhc_jax.evals.harness import LanguageModel
from mhc_jax.evals.registry import TASKS
from mhc_jax.model.generate import bucket
from mhc_jax.model.transformer import abstract_variables_of, compute_dtype
from mhc_jax.pods import aot
from mhc_jax.training import flops

BENCHMARKS = ("mmlu", "gsm8k", "bbh", "drop")
SAMPLE = 64  # prompts per benchmark tokenized for its token counts


def sample(examples: list, size: int = SAMPLE) -> list:
    step = max(1, len(examples) // size)
    return examples[::step][:size]


def estimate(config, target, devices: list, data_dir: str, utilisation: float, max_length: int = 2048) -> dict:
    aot.resolve_auto(config, target)
    config.model.moe.dispatch = "dropless"  # as eval.py runs it
    eval_data.check(data_dir)
    tokenizer = pipeline.load_data_tokenizer(config.data.dir, pipeline.load_manifest(config.data.dir))
    _, variables = abstract_variables_of(config.model)
    dtype = compute_dtype(config.model.dtype)
    sizes = serving.choose_mesh(variables, config.model, len(devices), None, target.memory_per_device, dtype)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(sizes), devices)
    model = LanguageModel.without_weights(config, mesh, target.memory_per_device, max_length)
    model.tokenizer = model.generator.tokenizer = tokenizer
    rate = len(devices) * (target.peak_flops or math.nan) * utilisation  # FLOP/s of the slice
    bandwidth = (target.memory_bandwidth or math.nan) * utilisation
    forward = lambda width: flops.train_flops_per_token(config.model, width) / 3  # noqa: E731
    parameters = serving.parameter_bytes(variables, sizes, dtype)
    tasks = {}
    for name in BENCHMARKS:
        task = TASKS[name].keywords["task"]
        examples = task.examples(Path(data_dir))
        chosen = sample(examples)
        scale = len(examples) / len(chosen)
        if task.max_new_tokens:
            lengths = [len(ids) for ids in model.generator.prompt_ids([e.prompt for e in chosen], task.max_new_tokens)]
            width = bucket(max(lengths))
            rows = model.rows(f"decode {task.max_new_tokens}", len(examples), (width,),
                              lambda r: model.generator.compiled_prefill(r, width, task.max_new_tokens))
            cache = model.generator.compiled_prefill(rows, width, task.max_new_tokens).memory_analysis().output_size_in_bytes
            slots = width + bucket(task.max_new_tokens)
            steps = math.ceil(len(examples) / rows) * task.max_new_tokens
            step_seconds = max(rows * forward(slots) / rate, (parameters + cache) / bandwidth)
            seconds = {"prefill": scale * sum(bucket(n) * forward(bucket(n)) for n in lengths) / rate,
                       "decoding": steps * step_seconds}
            tasks[name] = {"examples": len(examples), "rows": rows, "prompt_tokens": round(scale * sum(lengths)),
                           "decoding_steps": steps, "step_seconds": step_seconds, "seconds": seconds}
        else:
            groups = [group for example in chosen for group in model.shared_contexts(
                [(example.prompt, choice) for choice in example.choices]).items()]
            lengths = [(len(context), max(len(tokens) for _, tokens in continuations), len(continuations))
                       for context, continuations in groups]
            width = tuple(bucket(max(size[d] for size in lengths), smallest) for d, smallest in enumerate((16, 1, 1)))
            rows = model.rows("continue", len(examples), width, lambda r: model._continuation_logprobs.lower(
                model, model.params, model.abstract((r, width[0])), model.abstract((r,)),
                model.abstract((r, width[2], width[1]))).compile())
            tokens = [(bucket(n), bucket(k, 1) * (bucket(c, smallest=1) - 1)) for n, c, k in lengths]
            seconds = {"scoring": scale * sum(n * forward(n) + extra * forward(n + extra) for n, extra in tokens) / rate}
            tasks[name] = {"examples": len(examples), "rows": rows, "contexts": round(scale * len(groups)),
                           "tokens": round(scale * sum(len(context) + sum(len(tokens) for _, tokens in continuations)
                                                       for context, continuations in groups)), "seconds": seconds}
    terms = {(name, part): s for name, task in tasks.items() for part, s in task["seconds"].items()}
    largest = max(terms, key=terms.get)
    return {"topology": target.name, "devices": len(devices), "mesh": sizes, "dtype": config.model.dtype,
            "parameters_per_device": parameters, "utilisation": utilisation, "max_length": max_length,
            "tokenizer": str(Path(config.data.dir)), "tasks": tasks, "total_seconds": sum(terms.values()),
            "largest": {"task": largest[0], "part": largest[1], "seconds": terms[largest]}}


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report_text(spec: str, r: dict) -> str:
    mesh = ",".join(f"{a}={s}" for a, s in r["mesh"].items() if s > 1) or "data=1"
    lines = [f"{spec} evaluated on {r['topology']} ({r['devices']} devices, mesh {mesh}, {r['dtype']}, "
             f"{r['parameters_per_device'] / 2**30:.1f} GiB of parameters per device) at utilisation "
             f"{r['utilisation']:.0%}; prompts cut to {r['max_length']} tokens, counted by {r['tokenizer']}'s tokenizer:",
             "", "| task | examples | rows per batch | tokens | part | time |", "|---|---|---|---|---|---|"]
    for name, task in r["tasks"].items():
        tokens = task.get("tokens", task.get("prompt_tokens"))
        for part, seconds in task["seconds"].items():
            lines.append(f"| {name} | {task['examples']} | {task['rows']} | {tokens:,} | {part} | {duration(seconds)} |")
    largest = r["largest"]
    lines += ["", f"total {duration(r['total_seconds'])}; the largest term: {largest['task']} {largest['part']} "
              f"({duration(largest['seconds'])})"]
    return "\n".join(lines)
