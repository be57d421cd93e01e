"""Tokenizers of the LM: UTF-8 bytes, or byte-level BPE through HF `tokenizers`.

    tok = ByteTokenizer()                                   # 256 ids, NUL ends a document
    tok = BPETokenizer.train(texts, vocab_size=4096)        # offline, on the training split
    tok.save(run_dir / TOKENIZER_FILE); tok = BPETokenizer.load(path)
    ids = tok.encode("def f():"); text = tok.decode(ids)

Both have `vocab_size`, `eos_id` (placed between packed documents), `encode`, `encode_batch`
and `decode`. The BPE tokenizer is GPT-2's scheme: text is mapped to bytes first, so every
string is encodable and no id is unknown; its first id is the end-of-document token.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
_EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; NUL (id 0) never occurs in text, so it marks a document's end."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with an end-of-document token."""

    def __init__(self, tokenizer, source: str = ""):
        self.tokenizer = tokenizer
        eos = next((tokenizer.token_to_id(n) for n in _EOS_NAMES if tokenizer.token_to_id(n) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer {source or ''} has no end-of-document token (one of {list(_EOS_NAMES)}); "
                             f"add one, or let the trainer fit a tokenizer (drop data.tokenizer_path)")
        self.eos_id = eos

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        """Fit on an iterable of strings; the result has at most `vocab_size` ids (fewer on a small corpus)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, "trained")

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(Tokenizer.from_file(str(path)), str(path))

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


Tokenizer = ByteTokenizer | BPETokenizer


def run_tokenizer(run_dir: str | Path, kind: str) -> Tokenizer:
    """The tokenizer a run trained with: bytes, or RUN_DIR/tokenizer.json."""
    if kind == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(Path(run_dir) / TOKENIZER_FILE)
