"""eval.py and the harness: prompts as specified, batching that changes no score, the lm-eval
adapter, the end-to-end run on every task, and the bad inputs."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import WORDS, assert_user_error, corpus_documents, prepare_small_corpus, xla_flags
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import aggregate_subtask_metrics

from configs.pretrain import get_config
from mhc_jax.errors import UserError
from mhc_jax.evals import eval_data, hellaswag, registry, serving, speed, triviaqa
from mhc_jax.evals.harness import LanguageModel, aggregate, sharing_pays
from mhc_jax.evals.lm_eval_adapter import HarnessModel
from mhc_jax.pods import eval_estimate, topology
from mhc_jax.training import checkpoint

ROOT = Path(__file__).parents[1]
ALL_TASKS = ",".join(registry.TASKS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An mhc debug model trained for a few steps on a small corpus (a 400-token BPE)."""
    folder = tmp_path_factory.mktemp("evals")
    prepare_small_corpus(folder)
    result = subprocess.run([sys.executable, "train.py", "--config=configs/pretrain.py:mhc,debug",
                             f"--workdir={folder / 'run'}", f"--config.data.dir={folder / 'data'}",
                             "--config.train.steps=4", "--config.log.progress=False"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder / "run"


def run_eval(*args, devices: int = 1):
    """eval.py on one CPU device (decoding is step by step: 8 simulated devices only add overhead;
    the in-process tests here run sharded over 8)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


REQUESTS = [("The stream of", " residual"), ("Sinkhorn keeps the gain ", "near one."), ("", "A whole text."),
            (corpus_documents()[3], " and"), ("x" * 3, " y" * 40)]


@pytest.mark.slow
def test_batching_changes_no_loglikelihood(workdir):
    alone = LanguageModel(workdir, batch_size=1).loglikelihood(REQUESTS)
    together = LanguageModel(workdir, batch_size=8).loglikelihood(REQUESTS)
    np.testing.assert_allclose([s for s, _ in together], [s for s, _ in alone], rtol=1e-5)
    assert [g for _, g in together] == [g for _, g in alone]
    assert all(s < 0 for s, _ in alone)


@pytest.mark.slow
def test_requests_with_one_context_share_its_pass_and_score_as_alone(workdir):
    """Requests scored from one pass per context (MMLU-style one-token answers from its last
    logits, HellaSwag-style endings of several tokens each extending its KV cache; a context cut
    to max_length too) equal each request scored as a whole sequence of its own; a short context
    with longer continuations (PIQA-style) is scored whole."""
    model = LanguageModel(workdir, batch_size=4, max_length=128)
    contexts = [f"{text}\nAnswer:" for text in corpus_documents(6)[:3]] + ["x" * 300]
    answers = [f" {word}" for word in WORDS if len(model.tokenizer.encode_batch([f" {word}"])[0]) == 1][:4]
    endings = [" the gain stays near one.", " and", " Sinkhorn projects the mixing matrix again and again."]
    assert len(answers) == 4 and all(len(model.tokenizer.encode_batch([e])[0]) > 1 for e in endings[::2])
    requests = [(context, continuation) for context in contexts for continuation in answers + endings]
    requests += [("Goal:", ending) for ending in endings]
    passes, sequences = [], []
    original, whole = model.score_continuations, model.score_tokens
    model.score_continuations = lambda groups, desc="": passes.append(len(groups)) or original(groups, desc)
    model.score_tokens = lambda items, desc="": sequences.append(len(items)) or whole(items, desc)
    shared = model.loglikelihood(requests)
    model.score_tokens = whole
    groups = model.shared_contexts(requests)
    pays = {context: sharing_pays(len(context), [len(tokens) for _, tokens in group]) for context, group in groups.items()}
    assert not pays[tuple(model.encode_pair("Goal:", endings[0])[0])]  # short context, longer continuations
    assert passes == [sum(pays.values())] and sequences == [sum(len(groups[c]) for c in pays if not pays[c])]
    assert 3 <= sum(pays.values()) < len(pays)  # both ways taken
    alone, cut_contexts = [], set()
    for request in requests[:-len(endings)]:
        context, continuation = model.encode_pair(*request)
        tokens = (context + continuation)[-129:]
        scored = min(len(continuation), len(tokens) - 1)
        alone += model.score_tokens([(tokens, scored)])
        cut_contexts.add(tuple(tokens[:-scored]))
    assert len(cut_contexts) < len(requests) / 3  # a context cut to max_length: the same for continuations as long
    alone += [model.score_tokens([(lambda c, e: (c + e, len(e)))(*model.encode_pair(*r))])[0] for r in requests[-3:]]
    np.testing.assert_allclose([s for s, _ in shared], [s for s, _ in alone], rtol=1e-5)
    assert [g for _, g in shared] == [g for _, g in alone] and all(s < 0 for s, _ in shared)
    assert len({s for s, _ in shared[:7]}) == 7  # seven continuations, seven scores


@pytest.mark.slow
def test_scoring_and_decoding_split_the_batch_over_the_devices(workdir):
    """Traced under the parameters' mesh, the model's sharding constraints apply: each of the 8
    devices makes the logits of its share of the batch (computed whole on every device, an 8-device
    forward pass ran 8x slower than one device's), a prefill those of the last position only; only
    the scores come back whole."""
    assert jax.device_count() == 8
    model = LanguageModel(workdir, batch_size=8)
    vocab = model.config.model.vocab_size
    scoring = model._token_logprobs.lower(model, model.params, *[model.abstract((8, 64))] * 2).compile()
    prefill = model.generator.compiled_prefill(8, 64, 16)
    for compiled, per_device in ((scoring, "1,64"), (prefill, "1")):  # a prefill: only the last logits
        hlo = compiled.as_text()
        assert f"f32[{per_device},{vocab}]" in hlo and f"f32[8,{vocab}]" not in hlo and f"f32[8,64,{vocab}]" not in hlo
    assert f"f32[1,64,{vocab}]" not in prefill.as_text()
    assert scoring.output_shardings[0].is_fully_replicated


@pytest.mark.slow
def test_auto_batches_fill_the_device_and_never_exceed_it(workdir):
    """--batch_size=auto on 8 devices: more than 8 rows where they fit (scores as at 8 rows); on a
    device with less memory, the most rows whose compiled step fits it; none fitting: one line."""
    requests = [(" ".join(WORDS[i:i + 3 + i % 9]), " the gain") for i in range(40)]
    model = LanguageModel(workdir)
    assert model.batch_size == "auto" and dict(model.mesh.shape)["data"] == 8
    scores = model.loglikelihood(requests)
    (kind, width, cap), rows = max(model.fitting.items(), key=lambda item: item[0][1])
    assert rows == cap == 40 and len(model.fitting) == 1  # all in one batch
    at_eight = LanguageModel(workdir, batch_size=8).loglikelihood(requests)
    np.testing.assert_allclose([s for s, _ in scores], [s for s, _ in at_eight], rtol=1e-5)
    compiled = lambda rows: model._token_logprobs.lower(  # noqa: E731
        model, model.params, *[model.abstract((rows, *width))] * 2).compile()
    model.memory, model.fitting = serving.memory_of(compiled(16)), {}
    np.testing.assert_allclose([s for s, _ in model.loglikelihood(requests)], [s for s, _ in scores], rtol=1e-5)
    assert model.fitting[kind, width, cap] == 16 and serving.memory_of(compiled(32)) > model.memory
    model.memory, model.fitting = serving.memory_of(compiled(8)) - 1, {}
    with pytest.raises(UserError, match="--batch_size: even 8 rows"):
        model.loglikelihood(requests)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(workdir, fetched_eval_data, tmp_path):
    """eval.py --distributed through the stand-in srun: 2 processes x 4 devices write the results
    file that 1 process x 8 devices writes, byte for byte (rolling windows, scoring, decoding)."""
    data_dir, _ = fetched_eval_data
    args = ["--tasks=perplexity,mmlu,drop", "--limit=3", f"--data_dir={data_dir}"]  # DROP decodes 50 tokens
    copies = [tmp_path / name for name in ("one", "two")]
    for copy in copies:
        shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
    one = run_eval(f"--workdir={copies[0]}", *args, devices=8)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "SLURM_JOB_ID": str(1000 + (os.getpid() + 11) % 3000),
           "SLURM_NTASKS": "2"}
    two = subprocess.run([str(ROOT / "tests/fake_slurm/srun"), sys.executable, "eval.py", "--distributed",
                          f"--workdir={copies[1]}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=env)
    assert two.returncode == 0, two.stderr
    written = [(copy / "eval" / "4" / "results.json").read_bytes() for copy in copies]
    assert written[0] == written[1] and b'"drop"' in written[0]
    assert two.stdout.count("wrote ") == 1  # process 0 writes and prints
    assert_user_error(run_eval(f"--workdir={workdir}", "--distributed", *args), "--distributed", "--num_processes")


@pytest.mark.slow
def test_rolling_loglikelihood_is_the_text_after_end_of_text(workdir):
    model = LanguageModel(workdir, batch_size=4, max_length=16)
    texts = [corpus_documents()[0][:60], corpus_documents()[1]]
    rolling = model.rolling_loglikelihood(texts)
    whole = LanguageModel(workdir, batch_size=4, max_length=1024).loglikelihood([("", text) for text in texts])
    np.testing.assert_allclose(rolling[0], whole[0][0], rtol=1e-4)  # one window: the same computation
    assert rolling[1] < whole[1][0]  # windows of 16 tokens see less context than the whole text


@pytest.mark.slow
def test_lm_eval_adapter_answers_like_the_harness(workdir):
    adapter = HarnessModel(workdir=str(workdir), batch_size=4)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    expected = adapter.model.loglikelihood(REQUESTS)
    np.testing.assert_allclose([s for s, _ in adapter.loglikelihood(requests)], [s for s, _ in expected], rtol=1e-5)
    generations = adapter.generate_until([
        Instance("generate_until", {}, ("The stream", {"until": ["\n"], "max_gen_toks": 8}), 0),
        Instance("generate_until", {}, ("Sinkhorn", {"until": "."}), 1)])
    assert len(generations) == 2 and all(isinstance(g, str) for g in generations)
    assert "\n" not in generations[0] and "." not in generations[1]
    assert adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Some text.",), 0)])[0] < 0


@pytest.mark.slow
def test_lm_eval_adapter_honours_sampling_kwargs(workdir):
    """Greedy unless do_sample; seeded sampling differs from greedy and repeats with its seed; what the
    decoder cannot do is refused, not ignored."""
    adapter = HarnessModel(workdir=str(workdir), batch_size=4)

    def generate(**options):
        return adapter.generate_until([Instance("generate_until", {}, ("The stream of", {"until": [],
                                                "max_gen_toks": 24, **options}), i) for i in range(3)])
    greedy = generate()
    assert generate(do_sample=False, temperature=0.7) == greedy and len(set(greedy)) == 1
    sampled = generate(do_sample=True, temperature=1.0, seed=3)
    assert sampled != greedy and len(set(sampled)) > 1  # rows of a batch draw their own samples
    assert generate(do_sample=True, temperature=1.0, seed=3) == sampled
    assert generate(do_sample=True, temperature=1.0, seed=4) != sampled
    assert generate(temperature=1.0, seed=3) == sampled  # lm-eval: a temperature > 0 alone means sampling
    for refused in ({"top_p": 0.9, "do_sample": True, "temperature": 1.0}, {"top_k": 40}, {"num_beams": 4},
                    {"do_sample": True, "temperature": 0.0}):
        with pytest.raises(ValueError):
            generate(**refused)
    assert generate(top_p=1.0, top_k=0) == greedy


def write_eval_folder(folder: Path, files: dict[str, list[dict]]) -> Path:
    """A benchmark folder with our own made-up rows and a manifest that eval_data accepts."""
    entries = {}
    for relative, rows in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        entries[relative] = {"rows": len(rows), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"format": eval_data.FORMAT, "files": entries}))
    return folder


MADE_UP = {
    "mmlu/dev.jsonl": [{"subject": "college_physics", "question": "What falls? ", "choices": ["a", "b", "c", "d"],
                        "answer": 2}],
    "mmlu/test.jsonl": [{"subject": "college_physics", "question": "Why?", "choices": ["w", "x", "y", "z"],
                         "answer": 0}],
    "gsm8k/fewshot.jsonl": [{"question": "1 + 1?", "target": "It is 2. The answer is 2."}],
    "gsm8k/test.jsonl": [{"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4", "target": "4"}],
    "bbh/toy.jsonl": [{"task": "toy", "input": "Is it?", "target": "Yes",
                       "prompt": "Answer.\n\nQ: Was it?\nA: Let's think step by step.\nIt was. So the answer is No."
                                 "\n\nQ: Is it?\nA: Let's think step by step."}],
    "drop/fewshot.jsonl": [{"passage": "P1.", "question": "Q1?", "answer": "A1"}],
    "drop/validation.jsonl": [{"query_id": "q", "passage": "P.", "question": "Q?", "answers": [["x"]]}],
    "hellaswag/validation.jsonl": [{"activity_label": "Baking", "ctx_a": "She mixes", "ctx_b": "then  bakes",
                                    "endings": ["it [title] well.", "b", "c", "d"], "label": 0}] * 2,
    "piqa/validation.jsonl": [{"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0}],
    "triviaqa/validation.jsonl": [{"question": "Who", "aliases": ["Me", "me!"], "value": "Me"}] * 2,
    "math/fewshot.jsonl": [{"problem": "1+1", "solution": "$\\boxed{2}$\nFinal Answer: The final answer is $2$. "
                                                          "I hope it is correct."}],
    "math/test.jsonl": [{"problem": "2+2", "solution": "$\\boxed{4}$", "answer": "4", "level": "Level 1",
                         "type": "Algebra"}],
}
GOLDEN = {
    "mmlu": "The following are multiple choice questions (with answers) about college physics.\n\n"
            "What falls?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\nWhy?\nA. w\nB. x\nC. y\nD. z\nAnswer:",
    "gsm8k": "Q: 1 + 1?\nA: It is 2. The answer is 2.\n\nQ: 2 + 2?\nA:",
    "bbh": "Answer.\n\nQ: Was it?\nA: Let's think step by step.\nIt was. So the answer is No.\n\nQ: Is it?\n"
           "A: Let's think step by step.\n",
    "drop": "Passage: P1.\nQuestion: Q1?\nAnswer: A1\n\nPassage: P.\nQuestion: Q?\nAnswer:",
    "hellaswag": "Baking: She mixes Then bakes it. well.\n\nBaking: She mixes Then bakes",
    "piqa": "Question: Open a jar\nAnswer:",
    "triviaqa": "Question: Who?\nAnswer: Me\n\nQuestion: Who?\nAnswer:",
    "math": "Problem:\n1+1\n\nSolution: $\\boxed{2}$\nFinal Answer: The final answer is $2$. I hope it is correct."
            "\n\nProblem:\n2+2\n\nSolution:",
}


def test_prompts_are_rendered_exactly(tmp_path, monkeypatch):
    folder = write_eval_folder(tmp_path / "eval", MADE_UP)
    monkeypatch.setattr(hellaswag, "SHOTS", 1)
    monkeypatch.setattr(triviaqa, "SHOTS", 1)
    for name, golden in GOLDEN.items():
        task = registry.TASKS[name].keywords["task"]
        example = task.examples(folder)[0]
        assert example.prompt == golden, name
    assert registry.TASKS["mmlu"].keywords["task"].examples(folder)[0].choices == (" A", " B", " C", " D")
    assert registry.TASKS["hellaswag"].keywords["task"].examples(folder)[0].choices[0] == " it. well."


@pytest.mark.slow
def test_every_task_end_to_end(workdir, fetched_eval_data):
    data_dir, _ = fetched_eval_data
    result = run_eval(f"--workdir={workdir}", f"--tasks={ALL_TASKS}", "--limit=2", f"--data_dir={data_dir}")
    assert result.returncode == 0, result.stderr
    results = json.loads((workdir / "eval" / "4" / "results.json").read_text())
    assert results["step"] == 4 and set(results["tasks"]) == set(registry.TASKS)
    for name, task in results["tasks"].items():
        assert task["n"] == 2 and task["limit"] == 2 and task["protocol"], name
        assert task["primary"] in task["metrics"], name
        assert all(np.isfinite(v) for v in task["metrics"].values()), name
        if name != "perplexity":
            assert all(0.0 <= v <= 1.0 for v in task["metrics"].values()), name
    assert "DROP EM and F1; on the fixed 1000-question validation subsample" in results["tasks"]["drop"]["protocol"]
    assert results["tasks"]["perplexity"]["metrics"]["bits_per_byte"] > 0
    for name in ALL_TASKS.split(","):
        assert name in result.stdout
    again = run_eval(f"--workdir={workdir}", "--tasks=piqa", "--limit=1", f"--data_dir={data_dir}")
    assert again.returncode == 0, again.stderr
    merged = json.loads((workdir / "eval" / "4" / "results.json").read_text())
    assert merged["tasks"]["piqa"]["n"] == 1 and merged["tasks"]["mmlu"] == results["tasks"]["mmlu"]


@pytest.mark.slow
def test_the_speed_benchmark_times_each_task_and_keeps_its_score(workdir, fetched_eval_data):
    data_dir, _ = fetched_eval_data
    report = speed.benchmark(workdir, data_dir, ["piqa", "perplexity"], 2, batch_size=4, max_length=256)
    assert list(report["tasks"]) == ["piqa", "perplexity"] and report["step"] == 4 and report["load_seconds"] > 0
    for name, task in report["tasks"].items():
        assert task["examples"] == 2 and task["examples_per_sec"] == pytest.approx(2 / task["seconds"])
    alone = registry.TASKS["piqa"](LanguageModel(workdir, batch_size=4, max_length=256), data_dir, 2)
    assert report["tasks"]["piqa"]["acc"] == alone["metrics"]["acc"]


@pytest.mark.slow
def test_bad_inputs(workdir, fetched_eval_data, tmp_path):
    data_dir, _ = fetched_eval_data
    assert_user_error(run_eval(f"--workdir={workdir}", f"--data_dir={tmp_path / 'none'}"),
                      "fetch_eval_data.py", str(tmp_path / "none"))
    assert_user_error(run_eval(f"--workdir={workdir}", "--tasks=mmlu,squad", f"--data_dir={data_dir}"),
                      "--tasks", "squad")
    assert_user_error(run_eval(f"--workdir={tmp_path}", f"--data_dir={data_dir}"), "has no checkpoints")
    assert_user_error(run_eval(f"--workdir={workdir}", "--step=99", f"--data_dir={data_dir}"), "--step", "99")
    assert_user_error(run_eval(f"--workdir={workdir}", "--batch_size=0"), "--batch_size", "'0'")
    assert_user_error(run_eval(f"--workdir={workdir}", "--mesh=data=3", "--tasks=perplexity"), "--mesh", "3")
    tampered = tmp_path / "tampered"
    write_eval_folder(tampered, {"piqa/validation.jsonl": MADE_UP["piqa/validation.jsonl"]})
    (tampered / "piqa" / "validation.jsonl").write_text(json.dumps({"goal": "changed"}) + "\n")
    assert_user_error(run_eval(f"--workdir={workdir}", "--tasks=piqa", f"--data_dir={tampered}"),
                      "piqa/validation.jsonl", "sha256")


@pytest.mark.slow
def test_the_time_estimate_counts_the_benchmarks_as_eval_py_encodes_them(workdir, tmp_path):
    """scripts/dry_run.py --eval's estimate (here on the 8 CPU devices, given a peak and a bandwidth):
    rows that fit, the prompts' tokens as eval.py encodes them (MMLU: one pass per context), every
    batch decoding its whole budget, and the largest term named."""
    folder = write_eval_folder(tmp_path / "eval", MADE_UP)
    config = get_config("mhc,debug")
    config.data.dir = str(workdir.parent / "data")
    made_up = topology.Topology("made-up", "cpu", 8, 2**30, 1e12, memory_bandwidth=1e11)
    report = eval_estimate.estimate(config, made_up, jax.devices(), str(folder), 0.5)
    assert report["mesh"]["data"] == 8 and set(report["tasks"]) == {"mmlu", "gsm8k", "bbh", "drop"}
    model = LanguageModel(workdir)
    for name, task in report["tasks"].items():
        spec = registry.TASKS[name].keywords["task"]
        example, = spec.examples(folder)
        assert task["examples"] == 1 and task["rows"] == 8
        if spec.max_new_tokens:
            assert task["prompt_tokens"] == len(model.generator.prompt_ids([example.prompt], spec.max_new_tokens)[0])
            assert task["decoding_steps"] == spec.max_new_tokens and set(task["seconds"]) == {"prefill", "decoding"}
        else:  # MMLU's letters are several tokens of this 400-token BPE: one context, four continuations
            pairs = [model.encode_pair(example.prompt, choice) for choice in example.choices]
            assert all(len(answer) > 1 for _, answer in pairs) and len({tuple(c) for c, _ in pairs}) == 1
            assert task["contexts"] == 1 and task["tokens"] == len(pairs[0][0]) + sum(len(a) for _, a in pairs)
    terms = [s for task in report["tasks"].values() for s in task["seconds"].values()]
    assert report["largest"]["seconds"] == max(terms) and report["total_seconds"] == pytest.approx(sum(terms))
    assert report["largest"]["task"] == "bbh" and report["largest"]["part"] == "decoding"  # 1,024 steps


@pytest.mark.slow
def test_a_checkpoint_older_than_the_model_fields_it_lacks_scores_as_before(workdir, tmp_path):
    """A checkpoint whose config predates model fields (head_dim, qkv_bias, ...) reads with the
    values that mean what it computed (checkpoint.MODEL_FIELDS_ADDED_LATER)."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    meta_file = copy / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    model = meta["config"]["model"]
    for field, value in checkpoint.MODEL_FIELDS_ADDED_LATER.items():
        if isinstance(value, dict) and set(model[field]) > set(value):  # a group that gained fields
            for name in value:
                del model[field][name]
        else:
            del model[field]
    meta_file.write_text(json.dumps(meta))
    assert LanguageModel(copy, batch_size=8).loglikelihood(REQUESTS) == LanguageModel(workdir, batch_size=8).loglikelihood(REQUESTS)


@pytest.mark.slow
def test_an_unreadable_newest_step_is_skipped_and_left_alone(workdir, tmp_path, caplog):
    """eval.py reads a workdir, never changes it: a newest step without its metadata is passed over
    for the one before with a warning, and named when asked for by --step."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.copytree(copy / "checkpoints" / "4", copy / "checkpoints" / "6")
    shutil.rmtree(copy / "checkpoints" / "6" / "meta")
    assert LanguageModel(copy).step == 4
    assert "checkpoints/6 cannot be read" in caplog.text
    with pytest.raises(UserError, match="--step: .*/6 cannot be read"):
        LanguageModel(copy, step=6)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["4", "6"]


def test_headlines_weight_subtasks_by_size_as_lm_evals_groups():
    """Two tasks of 3 and 1 questions, accuracies 1/3 and 1: the headline is the mean over the 4
    questions (1/2; lm-eval's aggregate_subtask_metrics with weight_by_size), subtask_mean the mean of
    the task means (2/3; weight_by_size=False)."""
    names = ["a", "a", "a", "b"]
    per_example = [{"acc": 1.0}, {"acc": 0.0}, {"acc": 0.0}, {"acc": 1.0}]
    result = aggregate(names, per_example)
    assert result["metrics"] == {"acc": pytest.approx(0.5)}
    assert result["subtask_mean"] == {"acc": pytest.approx(2 / 3)}
    assert result["subtasks"] == {"a": {"acc": pytest.approx(1 / 3), "n": 3}, "b": {"acc": 1.0, "n": 1}}
    means, sizes = [1 / 3, 1.0], [3, 1]
    assert result["metrics"]["acc"] == pytest.approx(aggregate_subtask_metrics(means, sizes, weight_by_size=True))
    assert result["subtask_mean"]["acc"] == pytest.approx(aggregate_subtask_metrics(means, sizes, weight_by_size=False))
    assert "subtask_mean" not in aggregate(["", ""], [{"acc": 1.0}, {"acc": 0.0}])


@pytest.mark.slow
def test_lmeval_check_finds_full_agreement(workdir, fetched_eval_data):
    """scripts/lmeval_check.py: our eval.py path and lm-eval's own tasks (through our adapter) agree on
    prompts, log-likelihoods, generations and scores for the first examples of MMLU, GSM8K and BBH."""
    data_dir, _ = fetched_eval_data
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run([sys.executable, "scripts/lmeval_check.py", f"--workdir={workdir}", "--limit=2",
                             f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "mmlu: prompts 2/2, log-likelihoods 2/2, scores 2/2 agree" in lines
    assert "gsm8k: prompts 2/2, generations 2/2, scores 4/4 agree" in lines
    assert "bbh: prompts 2/2, generations 2/2, scores 2/2 agree" in lines and lines[-1] == "all agree"
    assert_user_error(subprocess.run([sys.executable, "scripts/lmeval_check.py", f"--workdir={workdir}",
                                      "--tasks=drop", f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=300, env=env), "--tasks", "drop")
