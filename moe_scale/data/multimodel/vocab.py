"""Word-level vocabulary shared by every language input and output of the MultiModel.

The paper shares one subword vocabulary across languages; the stand-in tasks have ~100 words
in all, so whole words (and punctuation marks) are the units here. Ids: 0 padding, 1 end of
sequence, 2 unknown word.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Words and single punctuation marks: "f(x) = 3." -> ["f", "(", "x", ")", "=", "3", "."]."""
    return _TOKEN.findall(text)


class Vocab:
    """Bidirectional word <-> id map; `Vocab.build` orders words by frequency, then alphabetically."""

    def __init__(self, words: Iterable[str]):
        self.itos = [*SPECIALS, *(w for w in words if w not in SPECIALS)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int | None = None, min_count: int = 1) -> "Vocab":
        counts = Counter(w for t in texts for w in tokenize(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[: None if max_size is None else max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, eos: bool = True) -> list[int]:
        ids = [self.stoi.get(w, UNK_ID) for w in tokenize(text)]
        return ids + [EOS_ID] if eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at the first EOS and skipping padding."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i != PAD_ID:
                words.append(self.itos[i] if i < len(self.itos) else UNK)
        return " ".join(words)
