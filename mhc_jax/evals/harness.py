"""The shared harness: a checkpoint as a language model (log-likelihoods of continuations, and
generations), the task interface every benchmark file fills in, and the runner that turns a task's
examples into its metrics.

Log-likelihoods follow lm-evaluation-harness: the context's trailing whitespace moves to the
continuation, the continuation's tokens are those of tokenize(context + continuation) past
tokenize(context), and a request longer than `max_length` keeps its last `max_length` tokens.
Requests are sorted by length and padded to power-of-two widths, so batching changes no score.
Requests with the same context whose continuations are one token each (MMLU's " A" .. " D") are
scored together from one forward pass over the context: causal attention makes the context's last
logits the same that each request's own pass computes.
"""

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mhc_jax import sharding, storage
from mhc_jax.data.tokenizer import file_sha256, load_tokenizer
from mhc_jax.errors import UserError
from mhc_jax.evals import serving
from mhc_jax.model.generate import Generator, bucket
from mhc_jax.model.transformer import abstract_variables_of, compute_dtype
from mhc_jax.training import checkpoint


@dataclasses.dataclass
class Example:
    prompt: str  # the whole context, few-shot exemplars included
    gold: Any  # what the task's score() compares against
    choices: tuple[str, ...] = ()  # multiple choice: the continuations scored by log-likelihood
    subtask: str = ""  # MMLU subject, BBH task, ...: per-subtask results


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    protocol: str  # how it is run and scored, shown with every result
    examples: Callable[[Path], list[Example]]  # from the folder of scripts/fetch_eval_data.py
    score: Callable[[Example, Any], dict[str, float]]  # (example, log-likelihoods or generated text)
    primary: str  # the headline metric
    until: tuple[str, ...] = ()  # generation: stop sequences
    max_new_tokens: int = 0  # > 0 makes it a generation task


def read_checkpoint(checkpoints: checkpoint.Checkpoints, pinned: int | None, mesh_sizes: dict | None):
    """(step, meta, params, graphdef) of step `pinned`, or of the newest step that reads, in the
    serving layout (serving.py; `mesh_sizes`: --mesh, None for the default); safe beside the train.py
    writing the workdir (checkpoint.read_newest), whose unreadable steps it skips but never moves."""
    def read(step):
        meta = checkpoints.read_meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        config.model.moe.dispatch = "dropless"  # evaluation never drops a token from its experts
        config.model.site_impl = "fast"  # compile-only (and absent from checkpoints before it existed)
        graphdef, variables = abstract_variables_of(config.model)
        dtype = compute_dtype(config.model.dtype)
        sizes = serving.choose_mesh(variables, config.model, jax.device_count(), mesh_sizes, serving.device_memory(),
                                    dtype)
        try:
            mesh = sharding.make_mesh(ml_collections.ConfigDict(sizes))
        except UserError as e:
            raise UserError(f"--{e}") from None  # make_mesh's 'mesh: ...' is about --mesh here
        params = checkpoints.restore_params(step, serving.serving_params(variables, mesh, dtype))
        meta["config"] = config.to_dict()
        return meta, params, graphdef

    if not checkpoints.steps():
        raise UserError(f"--workdir: {checkpoints.directory.parent} has no checkpoints; train first with "
                        f"train.py --workdir={checkpoints.directory.parent}")
    newest = checkpoints.read_newest(read, owner=False, pinned=pinned)
    if newest is None:
        raise UserError(f"--workdir: none of the checkpoints in {checkpoints.directory} can be read")
    return newest[0], *newest[1]


class LanguageModel:
    """A checkpoint restored in the serving layout (serving.py) over every process's devices, with
    the tokenizer it was trained with. Every process runs the same calls on the same requests and
    gets every result; batches are split over the data-parallel devices of all of them.

    `batch_size`: rows per batch, or 'auto': for each width, the most rows (up to the number of
    requests) whose compiled step fits a device by XLA's memory analysis."""

    def __init__(self, workdir, step: int | None = None, batch_size: int | str = "auto", max_length: int = 2048,
                 mesh: str = "auto"):
        workdir = storage.path(workdir)
        if not (workdir / "checkpoints").is_dir():
            raise UserError(f"--workdir: {workdir} has no checkpoints; train first with train.py --workdir={workdir}")
        checkpoints = checkpoint.Checkpoints(workdir, create=False)
        self.step, meta, params, graphdef = read_checkpoint(checkpoints, step, serving.parse_mesh(mesh))
        checkpoints.close()
        self.tokenizer_sha256 = meta["tokenizer_sha256"]
        self._serve(graphdef, params, ml_collections.ConfigDict(meta["config"]), load_workdir_tokenizer(workdir, meta),
                    batch_size, max_length, serving.device_memory())

    @classmethod
    def without_weights(cls, config, mesh, memory: int, max_length: int) -> "LanguageModel":
        """The model of `config` (its serving dtype decided) with abstract parameters on `mesh`, for
        a device of `memory` bytes: its steps compile, for dry runs; nothing runs."""
        model = cls.__new__(cls)
        graphdef, variables = abstract_variables_of(config.model)
        params = serving.serving_params(variables, mesh, compute_dtype(config.model.dtype))
        model._serve(graphdef, params, config, None, "auto", max_length, memory)
        return model

    def _serve(self, graphdef, params, config, tokenizer, batch_size, max_length: int, memory: int) -> None:
        self.graphdef, self.params, self.config, self.tokenizer = graphdef, params, config, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.generator = Generator(graphdef, params, tokenizer, max_length)
        self.mesh, self.memory, self.fitting = self.generator.mesh, memory, {}

    @functools.partial(jax.jit, static_argnums=0)
    def _token_logprobs(self, params, inputs_BT, targets_BT):
        with jax.sharding.use_abstract_mesh(self.generator.abstract_mesh):
            logits_BTV = nnx.merge(self.graphdef, params)(inputs_BT)
            logprobs_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
            return sharding.everywhere((logprobs_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT))

    @functools.partial(jax.jit, static_argnums=0)
    def _next_token_logprobs(self, params, inputs_BT, last_B, candidates_BK):
        with jax.sharding.use_abstract_mesh(self.generator.abstract_mesh):
            logits_BTV = nnx.merge(self.graphdef, params)(inputs_BT)
            logits_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]
            logprobs_BK = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), candidates_BK, axis=1)
            return sharding.everywhere((logprobs_BK, jnp.argmax(logits_BV, axis=-1)[:, None] == candidates_BK))

    def rows(self, kind: str, count: int, width: int, compile_rows) -> int:
        """Rows of a batch `width` wide when `count` requests are left: --batch_size, or (auto) the
        most that fit (`compile_rows`: rows -> the compiled step), in powers of two from the
        data-parallel device count, or all that are left. A narrower width starts from what fitted
        a wider one."""
        if self.batch_size != "auto":
            return self.batch_size
        unit = serving.data_parallel(self.mesh)
        cap = min(serving.MAX_AUTO_ROWS, unit * -(-count // unit))  # no padding rows beyond the requests
        if (kind, width, cap) not in self.fitting:
            wider = [rows for (k, w, c), rows in self.fitting.items() if k == kind and w >= width and c >= cap]
            start = min(max(wider, default=unit), cap)
            self.fitting[kind, width, cap] = serving.largest_batch(
                lambda rows: serving.compiled_memory(lambda: compile_rows(rows)), self.memory, start, cap)
        return self.fitting[kind, width, cap]

    def batches(self, kind: str, lengths: list[int], step, shapes) -> list[tuple[list[int], int, int]]:
        """Indices of `lengths` longest first in batches, each with its width and rows: `shapes(rows,
        width)` are the step's abstract arguments, to compile it for --batch_size=auto."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, first = [], 0
        while first < len(order):
            width = bucket(lengths[order[first]])
            rows = self.rows(kind, len(order) - first, width, lambda r: step.lower(self, self.params, *shapes(r, width))
                             .compile())
            batches.append((order[first:first + rows], width, rows))
            first += rows
        return batches

    def abstract(self, shape: tuple, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_layout(shape, self.mesh))

    def score_tokens(self, sequences: list[tuple[list[int], int]], desc: str = "") -> list[tuple[float, bool]]:
        """For token sequences each with a number of scored tokens at its end: the summed
        log-probability of those tokens and whether each was the greedy choice."""
        results: list = [None] * len(sequences)
        shapes = lambda rows, width: [self.abstract((rows, width))] * 2  # noqa: E731
        batches = self.batches("score", [len(tokens) - 1 for tokens, _ in sequences], self._token_logprobs, shapes)
        for batch, width, rows in progress(batches, desc):
            inputs, targets = np.zeros((2, rows, width), np.int32)
            for r, i in enumerate(batch):
                tokens = sequences[i][0]
                inputs[r, :len(tokens) - 1], targets[r, :len(tokens) - 1] = tokens[:-1], tokens[1:]
            logprobs, greedy = jax.device_get(self._token_logprobs(
                self.params, *(sharding.global_batch(a, self.mesh) for a in (inputs, targets))))
            for r, i in enumerate(batch):
                tokens, scored = sequences[i]
                span = slice(len(tokens) - 1 - scored, len(tokens) - 1)
                results[i] = (float(logprobs[r, span].sum()), bool(greedy[r, span].all()))
        return results

    def score_next_tokens(self, contexts: list[tuple[list[int], list[int]]], desc: str = "") -> list[list]:
        """For token contexts each with candidate next tokens: each candidate's log-probability
        after the context and whether it is the greedy choice, from one pass over the context."""
        if not contexts:
            return []
        width_k = bucket(max(len(candidates) for _, candidates in contexts), smallest=1)
        results: list = [None] * len(contexts)
        shapes = lambda rows, width: [self.abstract((rows, width)), self.abstract((rows,)),  # noqa: E731
                                      self.abstract((rows, width_k))]
        batches = self.batches("next", [len(tokens) for tokens, _ in contexts], self._next_token_logprobs, shapes)
        for batch, width, rows in progress(batches, desc):
            inputs, candidates = np.zeros((rows, width), np.int32), np.zeros((rows, width_k), np.int32)
            last = np.zeros(rows, np.int32)
            for r, i in enumerate(batch):
                tokens, choices = contexts[i]
                inputs[r, :len(tokens)], last[r], candidates[r, :len(choices)] = tokens, len(tokens) - 1, choices
            logprobs, greedy = jax.device_get(self._next_token_logprobs(
                self.params, *(sharding.global_batch(a, self.mesh) for a in (inputs, last, candidates))))
            for r, i in enumerate(batch):
                results[i] = [(float(logprobs[r, k]), bool(greedy[r, k])) for k in range(len(contexts[i][1]))]
        return results

    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "") -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding would produce it. One-token
        continuations of the same context share one pass (`score_next_tokens`)."""
        sequences, shared = [], {}  # whole sequences to score; context -> [(request, its one token)]
        for index, (context, continuation) in enumerate(requests):
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            tokens = (context_ids + continuation_ids)[-(self.max_length + 1):]
            if len(continuation_ids) == 1:
                shared.setdefault(tuple(tokens[:-1]), []).append((index, tokens[-1]))
            else:
                sequences.append((index, tokens, len(continuation_ids)))
        results: list = [None] * len(requests)
        scored = self.score_tokens([(tokens, count) for _, tokens, count in sequences], desc)
        for (index, _, _), result in zip(sequences, scored):
            results[index] = result
        groups = list(shared.values())
        scored = self.score_next_tokens([(list(context), [token for _, token in group])
                                         for context, group in shared.items()], desc)
        for group, row in zip(groups, scored):
            for (index, _), result in zip(group, row):
                results[index] = result
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        trailing = len(context) - len(context.rstrip())
        if trailing:
            context, continuation = context[:-trailing], context[-trailing:] + continuation
        whole, context_ids = (list(ids) for ids in self.tokenizer.encode_batch([context + continuation, context]))
        if not context_ids:  # an empty context: condition on end-of-text
            return [self.tokenizer.eos_id], whole
        return context_ids, whole[len(context_ids):]

    def rolling_loglikelihood(self, texts: list[str], desc: str = "") -> list[float]:
        """log P(text) from end-of-text, in windows of max_length tokens each conditioned on the
        token before it (lm-eval's loglikelihood_rolling)."""
        windows, owners = [], []
        for t, ids in enumerate(self.tokenizer.encode_batch(texts)):
            tokens = [self.tokenizer.eos_id, *ids]
            for start in range(0, len(tokens) - 1, self.max_length):
                window = tokens[start:start + self.max_length + 1]
                windows.append((window, len(window) - 1))
                owners.append(t)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.score_tokens(windows, desc)):
            totals[owner] += logprob
        return totals

    def generate(self, prompts: list[str], until: tuple[str, ...], max_new_tokens: int, desc: str = "",
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Greedy continuations (or sampled at `temperature` > 0, reproducibly from `seed`), longest
        prompts first."""
        lengths = [len(ids) for ids in self.generator.prompt_ids(prompts, max_new_tokens)]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        outputs: list = [None] * len(prompts)
        first = 0
        with progress(None, desc, total=len(prompts)) as bar:
            while first < len(order):
                width = bucket(lengths[order[first]])
                rows = self.rows(f"decode {max_new_tokens}", len(order) - first, width,
                                 lambda r: self.generator.compiled_prefill(r, width, max_new_tokens))
                batch = order[first:first + rows]
                texts = self.generator.generate([prompts[i] for i in batch], list(until), max_new_tokens, rows,
                                                temperature, seed + first)
                for i, text in zip(batch, texts):
                    outputs[i] = text
                first += rows
                bar.update(len(batch))
        return outputs


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar named `desc` on process 0 (none without a name)."""
    return tqdm(iterable, desc=desc, total=total, disable=not desc or jax.process_index() > 0, leave=False)


def load_workdir_tokenizer(workdir, meta: dict):
    """The tokenizer that train.py copied into the workdir, checked against the checkpoint."""
    paths = [p for p in (workdir / "tokenizer.json", workdir / "tokenizer.model") if p.exists()]
    if not paths or file_sha256(paths[0]) != meta["tokenizer_sha256"]:
        raise UserError(f"--workdir: {workdir} lacks the tokenizer its checkpoints were trained with "
                        "(tokenizer.json or tokenizer.model, written by train.py); copy it from the data folder")
    return load_tokenizer(storage.local_copy(paths[0]), meta.get("eos_token", ""))  # older checkpoints: not recorded


def run(model: LanguageModel, data_dir: Path, limit: int | None, task: Task) -> dict:
    """A task's metrics on (the first `limit` of) its examples, with per-subtask breakdowns."""
    examples = task.examples(data_dir)[:limit]
    outputs, per_example = answer(model, task, examples)
    return {**aggregate([e.subtask for e in examples], per_example), "primary": task.primary, "n": len(examples),
            "protocol": task.protocol, "samples": [{"prompt_tail": e.prompt[-200:], "output": o, "scores": s}
                                                   for e, o, s in list(zip(examples, outputs, per_example))[:3]]}


def answer(model: LanguageModel, task: Task, examples: list[Example]) -> tuple[list, list[dict]]:
    """The model's outputs on `examples` (generated texts, or the log-likelihood of each choice) and
    the task's scores of them."""
    desc = f"{task.name} ({len(examples)})"
    if task.max_new_tokens:
        outputs = model.generate([e.prompt for e in examples], task.until, task.max_new_tokens, desc)
    else:
        requests = [(e.prompt, choice) for e in examples for choice in e.choices]
        scores = iter(model.loglikelihood(requests, desc))
        outputs = [[next(scores)[0] for _ in e.choices] for e in examples]
    return outputs, [task.score(e, output) for e, output in zip(examples, outputs)]


def aggregate(subtask_names: list[str], per_example: list[dict]) -> dict:
    """The headline metrics as lm-eval's groups aggregate them (weight_by_size: the mean over all
    examples, i.e. subtasks weighted by their size: MMLU's subjects, BBH's tasks, MATH's types); each
    subtask's means and size; and, where there are subtasks, the unweighted mean of their means
    under its own name, `subtask_mean`."""
    subtasks = {}
    for name in sorted({n for n in subtask_names if n}):
        rows = [scores for n, scores in zip(subtask_names, per_example) if n == name]
        subtasks[name] = {**mean_metrics(rows), "n": len(rows)}
    result = {"metrics": mean_metrics(per_example), "subtasks": subtasks}
    if subtasks:
        result["subtask_mean"] = mean_metrics(list(subtasks.values()))
    return result


def mean_metrics(rows: list[dict]) -> dict:
    names = [k for k in rows[0] if k != "n"] if rows else []
    return {name: float(np.mean([row[name] for row in rows])) for name in names}


def write_results(path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_whole(path, json.dumps(results, indent=1, default=float) + "\n")
