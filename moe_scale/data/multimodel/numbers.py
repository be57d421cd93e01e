"""Number phrases in English, German and French from `num2words`, split into words.

German writes numbers as one compound ("dreihundertzweiundvierzig"); it is split into its
number morphemes ("drei hundert zwei und vierzig") so every language has a small word
vocabulary and translation has to reorder ("forty two" -> "zwei und vierzig").
"""

from __future__ import annotations

from functools import lru_cache

LANGUAGES = ("en", "de", "fr")

_GERMAN_MORPHEMES = sorted(
    "null eins ein zwei drei vier fünf sechs sieben acht neun zehn elf zwölf sechzehn siebzehn "
    "zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig hundert tausend und".split(),
    key=len,
    reverse=True,
)


def split_german(word: str) -> list[str]:
    """Greedy longest-match split of a German number compound into morphemes."""
    out, i = [], 0
    while i < len(word):
        piece = next((m for m in _GERMAN_MORPHEMES if word.startswith(m, i)), None)
        if piece is None:
            raise ValueError(f"cannot split German number word {word!r} at {word[i:]!r}")
        out.append(piece)
        i += len(piece)
    return out


@lru_cache(maxsize=None)
def number_words(n: int, lang: str) -> str:
    """`342, "de"` -> "drei hundert zwei und vierzig" (lower case, words separated by spaces)."""
    from num2words import num2words

    if lang not in LANGUAGES:
        raise ValueError(f"lang must be one of {LANGUAGES}, got {lang!r}")
    words = num2words(n, lang=lang).lower().replace("-", " ").replace(",", " ").split()
    if lang == "de":
        words = [piece for w in words for piece in split_german(w)]
    return " ".join(words)
