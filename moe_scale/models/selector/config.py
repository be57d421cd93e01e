"""Typed, validated configs of the Selector and of its generator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SelectorConfig:
    """The focus selector (Cho et al. 2019, sec. 3.2).

    vocab_size         word vocabulary (ids 0..3 are <pad>, <unk>, <s>, </s>)
    num_experts        K: expert embeddings, i.e. distinct focuses per source
    embed_dim          word embedding size
    hidden_dim         Bi-GRU output size (hidden_dim // 2 per direction)
    expert_dim         expert embedding size
    answer_dim         answer-position (BIO) embedding size; 0 = no answer input
    num_features       size of an extra categorical feature vocabulary (NER / POS tags); 0 = none
    feature_dim        embedding size of that feature
    dropout            on the encoder input
    threshold          test time: token is focus when sigmoid(logit) > threshold (0.15 for QG)
    """

    vocab_size: int
    num_experts: int = 3
    embed_dim: int = 64
    hidden_dim: int = 128
    expert_dim: int = 64
    answer_dim: int = 16
    num_features: int = 0
    feature_dim: int = 16
    dropout: float = 0.2
    threshold: float = 0.15

    def __post_init__(self):
        _vocab(self.vocab_size)
        _positive(num_experts=self.num_experts, embed_dim=self.embed_dim,
                  expert_dim=self.expert_dim, hidden_dim=self.hidden_dim)
        if self.hidden_dim % 2:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be even (it is split over the two GRU directions)")
        _non_negative(answer_dim=self.answer_dim, num_features=self.num_features, feature_dim=self.feature_dim)
        _unit(dropout=self.dropout)
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass
class GeneratorConfig:
    """Seq2seq with attention and copy; the encoder input is [word; focus; answer] embeddings.

    use_focus          concatenate a focus embedding to the encoder input (False = plain seq2seq,
                       the beam-search and sampling baselines)
    focus_dim          focus embedding size
    copy               pointer-generator: mix the vocabulary softmax with copying source words
    max_len            longest decoded output (tokens, </s> excluded)
    """

    vocab_size: int
    embed_dim: int = 64
    hidden_dim: int = 128
    answer_dim: int = 16
    focus_dim: int = 16
    use_focus: bool = True
    copy: bool = True
    dropout: float = 0.2
    max_len: int = 30

    def __post_init__(self):
        _vocab(self.vocab_size)
        _positive(embed_dim=self.embed_dim, hidden_dim=self.hidden_dim,
                  focus_dim=self.focus_dim, max_len=self.max_len)
        if self.hidden_dim % 2:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be even (it is split over the two GRU directions)")
        _non_negative(answer_dim=self.answer_dim)
        _unit(dropout=self.dropout)


def _vocab(vocab_size: int) -> None:
    if vocab_size <= 4:
        raise ValueError(f"vocab_size={vocab_size} holds only the 4 special tokens; build the vocabulary first")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _unit(**values: float) -> None:
    for name, value in values.items():
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
