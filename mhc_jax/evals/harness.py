"""The shared harness: a checkpoint as a language model (log-likelihoods of continuations, and
generations), the task interface every benchmark file fills in, and the runner that turns a task's
examples into its metrics.

Log-likelihoods follow lm-evaluation-harness: the context's trailing whitespace moves to the
continuation, the continuation's tokens are those of tokenize(context + continuation) past
tokenize(context), and a request longer than `max_length` keeps its last `max_length` tokens.
Requests are sorted by length and padded to power-of-two widths, so batching changes no score.
Requests with the same context (MMLU's four answers, HellaSwag's four endings) are scored from one
forward pass over the context: its last logits score each continuation's first token, and each
continuation's other tokens are scored by extending the context's KV cache with it. Causal
attention makes these the log-likelihoods that each request's own pass computes.
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
    def _continuation_logprobs(self, params, contexts_BT, start_B, continuations_BKC):
        """Each token's log-probability [B, K, C] in K continuations of each (left-padded) context,
        and whether it is the greedy choice: one pass over the context, then its cache extended by
        each continuation in turn (never by the last token, whose logits nothing reads)."""
        C = continuations_BKC.shape[2]
        with jax.sharding.use_abstract_mesh(self.generator.abstract_mesh):
            model = nnx.merge(self.graphdef, params)
            last_B1V, cache = model.decode(contexts_BT, model.init_cache(start_B, contexts_BT.shape[1] + C - 1),
                                           last_only=True)

            def score(continuation_BC):
                logits_BCV = last_B1V
                if C > 1:
                    logits_BCV = jnp.concatenate([last_B1V, model.decode(continuation_BC[:, :-1], cache)[0]], axis=1)
                logprobs_BC = -optax.softmax_cross_entropy_with_integer_labels(logits_BCV, continuation_BC)
                return logprobs_BC, jnp.argmax(logits_BCV, axis=-1) == continuation_BC

            per_choice = jax.lax.map(score, jnp.moveaxis(continuations_BKC, 1, 0))
            return sharding.everywhere(jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), per_choice))

    def rows(self, kind: str, count: int, width: tuple[int, ...], compile_rows) -> int:
        """Rows of a batch of padded sizes `width` when `count` requests are left: --batch_size, or
        (auto) the most that fit (`compile_rows`: rows -> the compiled step), in powers of two from
        the data-parallel device count, or all that are left. Narrower sizes start from what fitted
        wider ones."""
        if self.batch_size != "auto":
            return self.batch_size
        unit = serving.data_parallel(self.mesh)
        cap = min(serving.MAX_AUTO_ROWS, unit * -(-count // unit))  # no padding rows beyond the requests
        if (kind, width, cap) not in self.fitting:
            wider = [rows for (k, w, c), rows in self.fitting.items()
                     if k == kind and all(a >= b for a, b in zip(w, width)) and c >= cap]
            start = min(max(wider, default=unit), cap)
            self.fitting[kind, width, cap] = serving.largest_batch(
                lambda rows: serving.compiled_memory(lambda: compile_rows(rows)), self.memory, start, cap)
        return self.fitting[kind, width, cap]

    def batches(self, kind: str, sizes: list[tuple[int, ...]], step, shapes, smallest: tuple[int, ...] = (16,)
                ) -> list[tuple[list[int], tuple[int, ...], int]]:
        """Indices of `sizes` (each a request's lengths: its tokens, then others such as its
        continuations') in batches, each with its padded sizes (powers of two, at least `smallest`)
        and rows: requests are ordered by their other lengths' padded sizes, then by their tokens,
        largest first, and a batch ends where a request outgrows its first's sizes. `shapes(rows,
        width)` are the step's abstract arguments, to compile it for --batch_size=auto."""
        def padded(i):
            return tuple(bucket(n, low) for n, low in zip(sizes[i], smallest))

        order = sorted(range(len(sizes)), key=lambda i: tuple(-n for n in padded(i)[1:] + sizes[i][:1]))
        batches, first = [], 0
        while first < len(order):
            width = padded(order[first])
            fitting = next((k for k, i in enumerate(order[first:]) if any(n > w for n, w in zip(sizes[i], width))),
                           len(order) - first)
            rows = self.rows(kind, fitting, width, lambda r: step.lower(self, self.params, *shapes(r, width))
                             .compile())
            batches.append((order[first:first + min(rows, fitting)], width, rows))
            first += min(rows, fitting)
        return batches

    def abstract(self, shape: tuple, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_layout(shape, self.mesh))

    def score_tokens(self, sequences: list[tuple[list[int], int]], desc: str = "") -> list[tuple[float, bool]]:
        """For token sequences each with a number of scored tokens at its end: the summed
        log-probability of those tokens and whether each was the greedy choice."""
        results: list = [None] * len(sequences)
        shapes = lambda rows, width: [self.abstract((rows, *width))] * 2  # noqa: E731
        batches = self.batches("score", [(len(tokens) - 1,) for tokens, _ in sequences], self._token_logprobs, shapes)
        for batch, (width,), rows in progress(batches, desc):
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

    def score_continuations(self, groups: list[tuple[list[int], list[list[int]]]], desc: str = "") -> list[list]:
        """For token contexts each with continuations (token lists): each continuation's summed
        log-probability after its context and whether greedy decoding gives it, from one pass over
        the context (`_continuation_logprobs`)."""
        shapes = lambda rows, width: [self.abstract((rows, width[0])), self.abstract((rows,)),  # noqa: E731
                                      self.abstract((rows, width[2], width[1]))]
        sizes = [(len(context), max(map(len, continuations)), len(continuations)) for context, continuations in groups]
        batches = self.batches("continue", sizes, self._continuation_logprobs, shapes, smallest=(16, 1, 1))
        results: list = [None] * len(groups)
        for batch, (width, length, choices), rows in progress(batches, desc):
            contexts, start = np.zeros((rows, width), np.int32), np.full(rows, width - 1, np.int32)
            continuations = np.zeros((rows, choices, length), np.int32)
            for r, i in enumerate(batch):
                context, group = groups[i]
                contexts[r, width - len(context):], start[r] = context, width - len(context)
                for k, continuation in enumerate(group):
                    continuations[r, k, :len(continuation)] = continuation
            logprobs, greedy = jax.device_get(self._continuation_logprobs(
                self.params, *(sharding.global_batch(a, self.mesh) for a in (contexts, start, continuations))))
            for r, i in enumerate(batch):
                results[i] = [(float(logprobs[r, k, :len(c)].sum()), bool(greedy[r, k, :len(c)].all()))
                              for k, c in enumerate(groups[i][1])]
        return results

    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "") -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding would produce it. Requests with
        the same context tokens share one pass over them (`score_continuations`) where that computes
        fewer padded positions than scoring each as a whole sequence (`score_tokens`): MMLU's and
        HellaSwag's few-shot contexts do, PIQA's short goals with longer solutions mostly do not."""
        shared, whole = [], []
        for context, group in self.shared_contexts(requests).items():
            (shared if sharing_pays(len(context), [len(tokens) for _, tokens in group]) else whole).append((context, group))
        results: list = [None] * len(requests)
        scores = self.score_continuations([(list(context), [tokens for _, tokens in group]) for context, group in shared],
                                          desc)
        for (_, group), row in zip(shared, scores):
            for (index, _), result in zip(group, row):
                results[index] = result
        sequences = [(index, list(context) + tokens, len(tokens)) for context, group in whole for index, tokens in group]
        for (index, _, _), result in zip(sequences, self.score_tokens([(t, n) for _, t, n in sequences], desc)):
            results[index] = result
        return results

    def shared_contexts(self, requests: list[tuple[str, str]]) -> dict[tuple, list[tuple[int, list[int]]]]:
        """Context tokens -> [(request index, continuation tokens)]: the requests encoded, each cut
        to its last max_length + 1 tokens, and grouped by what precedes their continuations."""
        shared: dict = {}
        for index, (context, continuation) in enumerate(requests):
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            tokens = (context_ids + continuation_ids)[-(self.max_length + 1):]
            scored = min(len(continuation_ids), len(tokens) - 1)
            shared.setdefault(tuple(tokens[:-scored]), []).append((index, tokens[-scored:]))
        return shared

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
                rows = self.rows(f"decode {max_new_tokens}", len(order) - first, (width,),
                                 lambda r: self.generator.compiled_prefill(r, width, max_new_tokens))
                batch = order[first:first + rows]
                texts = self.generator.generate([prompts[i] for i in batch], list(until), max_new_tokens, rows,
                                                temperature, seed + first)
                for i, text in zip(batch, texts):
                    outputs[i] = text
                first += rows
                bar.update(len(batch))
        return outputs


def sharing_pays(context: int, continuations: list[int]) -> bool:
    """Whether one pass over a context of this many tokens, then its cache extended by each
    continuation, computes fewer padded positions than each request scored whole."""
    shared = bucket(context) + bucket(len(continuations), 1) * (bucket(max(continuations), 1) - 1)
    return 2 * shared <= sum(bucket(context + n - 1) for n in continuations)


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar named `desc` on process 0 (none without a name, or with nothing to do)."""
    count = total if iterable is None else len(iterable)
    return tqdm(iterable, desc=desc, total=total, disable=not desc or not count or jax.process_index() > 0, leave=False)


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
