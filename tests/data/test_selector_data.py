"""Selector data: guidance focus on hand-made examples, loaders on small local files, batches."""

from collections import Counter
from pathlib import Path

import pytest

from moe_scale.data.selector import (
    BOS, EOS, TAG_B, TAG_I, TAG_O, UNK, Example, Vocab, collate, qg_guidance, stem, summary_guidance, tokenize,
)
from moe_scale.data.selector_sources import QUESTIONS, load_cnndm, load_squad_qg, offline_qg, squad_example

DATA = Path(__file__).parent / "selector"


def tagged(source, focus):
    return [t for t, f in zip(source, focus) if f]


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Curie's lab, in 1898!") == ["curie's", "lab", ",", "in", "1898", "!"]


def test_porter_stemmer_conflates_inflections():
    assert stem("discovered") == stem("discover") == "discov"
    assert stem("cities") == stem("city")


def test_qg_guidance_tags_content_words_whose_stem_is_in_the_target():
    source = tokenize("Marie Curie discovered radium in Paris in 1898 .")
    target = tokenize("What did Curie discover in 1898 ?")
    focus = qg_guidance(source, target, answer_span=(3, 4))
    # "in" is in the target but a stopword; "discovered" matches "discover" by stem.
    assert tagged(source, focus) == ["curie", "discovered", "1898"]


def test_qg_guidance_never_tags_the_answer_span():
    source = tokenize("Marie Curie discovered radium in Paris .")
    target = tokenize("Where did Curie discover radium ?")
    assert tagged(source, qg_guidance(source, target)) == ["curie", "discovered", "radium"]
    assert tagged(source, qg_guidance(source, target, answer_span=(3, 4))) == ["curie", "discovered"]


def test_summary_guidance_greedy_longest_match():
    source = tokenize("the quick brown fox jumps over the lazy dog . it was fast")
    target = tokenize("quick brown fox jumps . the dog was lazy")
    focus = summary_guidance(source, target)
    # one 4-token phrase, then "dog" and "lazy"; lone ".", "the", "was" are skipped.
    assert [i for i, f in enumerate(focus) if f] == [1, 2, 3, 4, 7, 8]


def test_summary_guidance_prefers_an_untagged_occurrence():
    source = tokenize("red car . red car . blue car")
    focus = summary_guidance(source, tokenize("red car and red car"))
    assert [i for i, f in enumerate(focus) if f] == [0, 1, 3, 4]


def test_summary_guidance_longest_phrase_wins_over_earlier_short_match():
    source = tokenize("new park opened . a new park on monday")
    focus = summary_guidance(source, tokenize("new park on monday"))
    assert [i for i, f in enumerate(focus) if f] == [5, 6, 7, 8]


def test_squad_example_picks_the_answer_sentence_and_span():
    context = "Marie Curie was a physicist. She discovered radium in Paris in 1898. She won two Nobel prizes."
    ex = squad_example(context, "What did Curie discover in 1898?", "radium", context.index("radium"))
    assert ex.source == tokenize("She discovered radium in Paris in 1898.")
    assert ex.source[slice(*ex.answer_span)] == ["radium"]
    assert tagged(ex.source, ex.focus) == ["discovered", "1898"]
    assert squad_example(context, "q?", "radium", 3) is None  # offset does not match the text


def test_load_squad_qg_from_a_local_squad_json():
    examples = load_squad_qg(path=DATA / "squad_tiny.json")
    assert len(examples) == 3  # q4 has no answer
    two = examples[1]
    assert two.source == tokenize("She won two Nobel prizes.")
    assert two.source[slice(*two.answer_span)] == ["two"]
    assert tagged(two.source, two.focus) == ["nobel", "prizes"]  # "won" / "win": Porter keeps irregular forms apart
    assert examples[2].source == tokenize("It is the longest river in Africa!")
    assert [ex.group for ex in examples] == [0, 1, 2]
    assert len(load_squad_qg(path=DATA / "squad_tiny.json", limit=2)) == 2


@pytest.mark.parametrize("name", ["cnndm_tiny.jsonl", "cnndm_tiny.csv"])
def test_load_cnndm_from_local_files(name):
    examples = load_cnndm(path=DATA / name, max_src_len=50)
    assert len(examples) == 2
    first = examples[0]
    assert first.target[:6] == ["city", "council", "approved", "a", "new", "park"]
    assert tagged(first.source, first.focus)[:5] == ["city", "council", "approved", "a", "new"]
    assert "residents" not in tagged(first.source, first.focus)
    assert len(load_cnndm(path=DATA / name, max_src_len=5)[0].source) == 5


def test_jsonl_and_csv_give_the_same_examples():
    assert load_cnndm(path=DATA / "cnndm_tiny.jsonl") == load_cnndm(path=DATA / "cnndm_tiny.csv")


def test_offline_task_is_deterministic_with_several_targets_and_focuses():
    assert offline_qg(20, seed=3) == offline_qg(20, seed=3)
    assert offline_qg(20, seed=3) != offline_qg(20, seed=4)
    examples = offline_qg(10, seed=0, targets_per_source=None)
    per_source = 2 * len(QUESTIONS)
    assert len(examples) == 10 * per_source
    for g in range(10):
        group = [ex for ex in examples if ex.group == g]
        assert len({tuple(ex.target) for ex in group}) == per_source
        # each question type needs its own focus
        assert len({tuple(ex.focus) for ex in group[::2]}) == len(QUESTIONS)
    one = offline_qg(10, seed=0, targets_per_source=1)
    assert [ex.group for ex in one] == list(range(10))
    assert all(ex.source == examples[8 * ex.group].source for ex in one)


def test_offline_task_question_frequencies_follow_the_prior():
    examples = offline_qg(500, seed=0, targets_per_source=4)
    first_word = Counter(ex.target[0] for ex in examples)
    n = len(examples)
    # who: 0.4 (who 0.24 + which person 0.16); what 0.3; where 0.12 + in which 0.08; when 0.06
    assert abs(first_word["who"] / n - 0.24) < 0.03
    assert abs(first_word["what"] / n - 0.30) < 0.03
    assert abs(first_word["when"] / n - 0.06) < 0.02


def test_collate_extended_vocabulary_for_copying():
    vocab = Vocab.build([["who", "met", "bob", "?"]])
    source, target = ["zed", "met", "bob", "zed", "yul"], ["who", "met", "zed", "?", "yul"]
    ex = Example(source, target, [1, 0, 0, 1, 0], answer_span=(1, 3))
    batch = collate([ex, Example(["bob"], ["bob"], [1])], vocab)
    V = len(vocab)
    assert batch.oovs == [["zed", "yul"], []] and batch.num_oov == 2
    assert batch.src_BS[0].tolist() == [UNK, vocab.id("met"), vocab.id("bob"), UNK, UNK]
    assert batch.src_ext_BS[0].tolist() == [V, vocab.id("met"), vocab.id("bob"), V, V + 1]
    assert batch.tgt_in_BT[0].tolist() == [BOS, vocab.id("who"), vocab.id("met"), UNK, vocab.id("?"), UNK]
    assert batch.tgt_out_BT[0].tolist() == [vocab.id("who"), vocab.id("met"), V, vocab.id("?"), V + 1, EOS]
    assert batch.answer_BS[0].tolist() == [TAG_O, TAG_B, TAG_I, TAG_O, TAG_O]
    assert batch.src_mask_BS.sum(1).tolist() == [5, 1]
    assert batch.focus_BS[1].tolist() == [1, 0, 0, 0, 0]
    assert vocab.decode(batch.tgt_out_BT[0], batch.oovs[0]) == ["who", "met", "zed", "?", "yul"]


def test_example_rejects_mismatched_focus():
    with pytest.raises(ValueError, match="focus has 1 tags for 2"):
        Example(["a", "b"], ["a"], [1])
    with pytest.raises(ValueError, match="answer_span"):
        Example(["a"], ["a"], [1], answer_span=(0, 2))


def test_vocab_build_is_deterministic_and_respects_min_freq():
    vocab = Vocab.build([["b", "a", "b", "c"], ["a", "b"]], min_freq=2)
    assert vocab.itos[4:] == ["b", "a"]
    assert vocab.id("c") == UNK
