"""Selector metrics against values computed by hand."""

import pytest

from moe_scale.models.selector.metrics import oracle_bleu, rouge, self_bleu, sentence_bleu, top1_bleu


def test_bleu_known_value():
    # 1..4-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty: BLEU = 0.2 ** 0.25
    assert top1_bleu([["a b c d e"]], [["a b c d f"]]) == pytest.approx(100 * 0.2**0.25)
    assert top1_bleu([["a b c d e"]], [["a b c d e"]]) == pytest.approx(100)


def test_top1_uses_the_first_output_and_oracle_the_best():
    outputs = [["x y z w", "a b c d e"], ["k l m n", "p q r s"]]
    refs = [["a b c d e"], ["k l m n"]]
    assert top1_bleu(outputs, refs) < 60
    assert oracle_bleu(outputs, refs) == pytest.approx(100)


def test_multiple_references():
    assert top1_bleu([["a b c d e"]], [["q r s t u", "a b c d e"]]) == pytest.approx(100)


def test_self_bleu_identical_and_disjoint():
    assert self_bleu([["a b c d"] * 3, ["e f g h"] * 3]) == pytest.approx(100)
    assert self_bleu([["a b c d", "e f g h", "i j k l"]]) == pytest.approx(0)
    with pytest.raises(ValueError):
        self_bleu([["a b c d"]])


def test_self_bleu_is_the_mean_of_pairwise_bleu():
    outputs = [["a b c d e", "a b c d f", "a b c d e"]]
    pair = 100 * 0.2**0.25  # "a b c d e" vs "a b c d f", either way round
    assert self_bleu(outputs) == pytest.approx((4 * pair + 2 * 100) / 6)


def test_sentence_bleu_identical():
    assert sentence_bleu("a b c d", ["a b c d"]) == pytest.approx(100)


def test_rouge_known_values():
    scores = rouge(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)  # stemmed
