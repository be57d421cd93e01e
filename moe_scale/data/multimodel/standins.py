"""Offline stand-ins for the paper's corpora: small, shipped or generated deterministically.

    name              paper corpus          modality pair       stand-in
    digits_cls        ImageNet              image -> class      scikit-learn digits, 8x8 grey, 10 classes
    digits_caption    MS-COCO captions      image -> text       two digits side by side (8x16),
                                                                "a handwritten seven next to a four"
    translate_X_Y     WMT EN<->DE, EN<->FR  text -> text        number phrases 0..999 from num2words
                                                                (X, Y in en/de/fr, one of them en)
    parse_arith       WSJ parsing (PTB)     text -> tree        infix arithmetic "3 + 4 * ( 5 - 2 )" ->
                                                                "( + 3 ( * 4 ( - 5 2 ) ) )"
    speech_numbers    WSJ speech            audio -> text       numbers 0..999 spoken by espeak-ng,
                                                                40 log-mel bins (spoken_numbers.npz)

Every split is fixed by `seed`. The numbers 0..999 are split once for all the number tasks
(translation and speech): an evaluation number is never seen in training by any of them, so
joint training cannot memorise a held-out number through another task. Digit images are split
once too; captions of evaluation pairs use evaluation images only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from moe_scale.data.multimodel.audio import normalize
from moe_scale.data.multimodel.numbers import number_words
from moe_scale.data.multimodel.tasks import RawExample, TaskSpec

SPEECH_FILE = Path(__file__).with_name("spoken_numbers.npz")
NUMBER_EVAL_FRACTION = 0.15
Source = tuple[TaskSpec, list[RawExample], list[RawExample]]


def number_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) numbers of 0..999, shared by every number task."""
    perm = np.random.default_rng(seed).permutation(1000)
    n_eval = int(round(1000 * NUMBER_EVAL_FRACTION))
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


@lru_cache(maxsize=4)
def _digits(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1] in [0, 1]
    perm = np.random.default_rng(seed).permutation(len(images))
    n_eval = len(images) // 5
    return images, digits.target.astype(np.int64), perm[n_eval:], perm[:n_eval]


def digits_classification(seed: int = 0) -> Source:
    images, labels, train, ev = _digits(seed)
    spec = TaskSpec("digits_cls", "image", "class:digits", "image_label", num_classes=10,
                    description="sklearn digits 8x8 -> digit class (ImageNet stand-in)")
    return spec, [(images[i], labels[i]) for i in train], [(images[i], labels[i]) for i in ev]


def digits_captioning(seed: int = 0, n_train: int = 4000, n_eval: int = 300) -> Source:
    images, labels, train, ev = _digits(seed)
    rng = np.random.default_rng(seed + 1)

    def pairs(pool: np.ndarray, n: int) -> list[RawExample]:
        left, right = rng.choice(pool, n), rng.choice(pool, n)
        return [
            (np.concatenate([images[a], images[b]], axis=1),
             f"a handwritten {number_words(int(labels[a]), 'en')} next to a {number_words(int(labels[b]), 'en')}")
            for a, b in zip(left, right)
        ]

    spec = TaskSpec("digits_caption", "image", "language", "en", bleu=True,
                    description="two sklearn digits side by side (8x16) -> English caption (COCO stand-in)")
    return spec, pairs(train, n_train), pairs(ev, n_eval)


def number_translation(src: str, tgt: str, seed: int = 0) -> Source:
    train, ev = number_split(seed)
    spec = TaskSpec(f"translate_{src}_{tgt}", "language", "language", tgt, bleu=True,
                    description=f"number phrase {src} -> {tgt}, num2words (WMT stand-in)")
    train_pairs = [(number_words(int(n), src), number_words(int(n), tgt)) for n in train]
    return spec, train_pairs, [(number_words(int(n), src), number_words(int(n), tgt)) for n in ev]


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _random_tree(rng: np.random.Generator, depth: int):
    if depth == 0 or rng.random() < 0.3:
        return str(int(rng.integers(10)))
    op = "+-*/"[int(rng.integers(4))]
    return (op, _random_tree(rng, depth - 1), _random_tree(rng, depth - 1))


def infix(tree) -> str:
    """Infix with the fewest parentheses that keep the tree (operators are left-associative)."""
    if isinstance(tree, str):
        return tree
    op, left, right = tree
    prec = _PRECEDENCE[op]

    def wrap(child, strict: bool) -> str:
        text = infix(child)
        if isinstance(child, tuple) and (_PRECEDENCE[child[0]] < prec or (strict and _PRECEDENCE[child[0]] == prec)):
            return f"( {text} )"
        return text

    return f"{wrap(left, False)} {op} {wrap(right, True)}"


def linearize(tree) -> str:
    """Prefix bracketing, as the paper's linearised parse trees: "( + 3 ( * 4 5 ) )"."""
    if isinstance(tree, str):
        return tree
    op, left, right = tree
    return f"( {op} {linearize(left)} {linearize(right)} )"


def arithmetic_parsing(seed: int = 0, n_train: int = 4000, n_eval: int = 300, max_depth: int = 3) -> Source:
    rng = np.random.default_rng(seed + 2)
    seen: dict[str, str] = {}
    while len(seen) < n_train + n_eval:
        tree = _random_tree(rng, max_depth)
        if isinstance(tree, tuple):
            seen.setdefault(infix(tree), linearize(tree))
    items = list(seen.items())
    spec = TaskSpec("parse_arith", "language", "language", "parse_tree",
                    description="infix arithmetic -> linearised prefix tree (WSJ parsing stand-in)")
    return spec, items[:n_train], items[n_train:]


def load_spoken_numbers(path: Path = SPEECH_FILE) -> tuple[np.ndarray, list[np.ndarray]]:
    """(numbers `[N]`, log-mel features per utterance `[T_i, 40]` float32, normalised)."""
    with np.load(path) as f:
        lo, hi = float(f["lo"]), float(f["hi"])
        frames = lo + f["frames"].astype(np.float32) / 255.0 * (hi - lo)
        offsets, numbers = f["offsets"], f["numbers"]
    return numbers, [normalize(frames[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def speech_numbers(seed: int = 0, path: Path = SPEECH_FILE) -> Source:
    numbers, feats = load_spoken_numbers(path)
    train, ev = number_split(seed)
    by_number = {int(n): f for n, f in zip(numbers, feats)}

    def examples(ns: np.ndarray) -> list[RawExample]:
        return [(by_number[int(n)], number_words(int(n), "en")) for n in ns if int(n) in by_number]

    spec = TaskSpec("speech_numbers", "audio", "language", "en",
                    description="spoken number (espeak-ng, 40 log-mel) -> English words (WSJ speech stand-in)")
    return spec, examples(train), examples(ev)


STANDINS: dict[str, Callable[[int], Source]] = {
    "digits_cls": digits_classification,
    "digits_caption": digits_captioning,
    "translate_en_de": lambda seed=0: number_translation("en", "de", seed),
    "translate_de_en": lambda seed=0: number_translation("de", "en", seed),
    "translate_en_fr": lambda seed=0: number_translation("en", "fr", seed),
    "translate_fr_en": lambda seed=0: number_translation("fr", "en", seed),
    "parse_arith": arithmetic_parsing,
    "speech_numbers": speech_numbers,
}


def standin_sources(names: list[str] | None = None, seed: int = 0) -> list[Source]:
    """Raw (spec, train, eval) of the named stand-in tasks (all of them by default)."""
    names = list(STANDINS) if names is None else names
    unknown = [n for n in names if n not in STANDINS]
    if unknown:
        raise ValueError(f"unknown stand-in task(s) {unknown}; choose from {list(STANDINS)}")
    return [STANDINS[n](seed) for n in names]
