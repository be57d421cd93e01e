"""MultiModel tasks: vocabulary, stand-ins, collation, joint sampler, metrics, and the real-corpus
loaders on small local files in the corpora's formats (no hub access)."""

from __future__ import annotations

import ast
import io
import json
import os
import wave

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_scale.data.multimodel import hf  # noqa: E402
from moe_scale.data.multimodel.audio import log_mel, mel_filterbank, read_wav  # noqa: E402
from moe_scale.data.multimodel.metrics import bleu, exact_matches, majority_baseline, token_sums  # noqa: E402
from moe_scale.data.multimodel.numbers import number_words, split_german  # noqa: E402
from moe_scale.data.multimodel.sampler import JointSampler  # noqa: E402
from moe_scale.data.multimodel.standins import (  # noqa: E402
    STANDINS,
    infix,
    linearize,
    load_spoken_numbers,
    number_split,
    standin_sources,
)
from moe_scale.data.multimodel.tasks import TARGET_SPACES, TaskSpec, build_tasks, collate  # noqa: E402
from moe_scale.data.multimodel.vocab import EOS_ID, PAD_ID, UNK_ID, Vocab, tokenize  # noqa: E402


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in build_tasks(standin_sources())}


# ---- text ----------------------------------------------------------------------------------------


def test_vocab_roundtrip_unknown_and_order():
    vocab = Vocab.build(["b a a", "c a b"])
    assert vocab.itos[:6] == ["<pad>", "<eos>", "<unk>", "a", "b", "c"]
    ids = vocab.encode("a c zz")
    assert ids == [3, 5, UNK_ID, EOS_ID]
    assert vocab.decode(ids + [7, 7]) == "a c <unk>"
    assert vocab.decode([PAD_ID, 4, PAD_ID]) == "b"
    assert tokenize("f(x) = 3.") == ["f", "(", "x", ")", "=", "3", "."]


def test_number_words_in_three_languages():
    assert number_words(342, "en") == "three hundred and forty two"
    assert number_words(342, "de") == "drei hundert zwei und vierzig"
    assert number_words(342, "fr") == "trois cent quarante deux"
    assert split_german("siebzehn") == ["siebzehn"] and split_german("einhunderteins") == ["ein", "hundert", "eins"]
    for n in range(1000):  # every German compound splits into known morphemes
        assert "".join(number_words(n, "de").split()) == number_words(n, "de").replace(" ", "")


def _tree_of(node):
    """Python's own parse of an infix expression, linearised like the targets."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
    return f"( {op} {_tree_of(node.left)} {_tree_of(node.right)} )"


def test_arithmetic_targets_are_the_parse_of_the_inputs(tasks):
    task = tasks["parse_arith"]
    for example in task.train[:300] + task.eval:
        source = task.vocab.decode(example.inputs)
        assert _tree_of(ast.parse(source, mode="eval").body) == example.reference
    assert infix(("-", "1", ("-", "2", "3"))) == "1 - ( 2 - 3 )"
    assert linearize(("*", ("+", "1", "2"), "3")) == "( * ( + 1 2 ) 3 )"
    train = {e.reference for e in task.train}
    assert not train & {e.reference for e in task.eval}


# ---- stand-ins -----------------------------------------------------------------------------------


def test_standins_cover_five_tasks_and_four_modality_pairs(tasks):
    assert len(tasks) == len(STANDINS) >= 5
    pairs = {(t.spec.input_modality, "class" if t.spec.is_classification else "language") for t in tasks.values()}
    assert pairs == {("image", "class"), ("image", "language"), ("language", "language"), ("audio", "language")}
    vocabs = {id(t.vocab) for t in tasks.values()}
    assert len(vocabs) == 1  # one shared vocabulary
    for t in tasks.values():
        assert t.train and t.eval


def test_standins_are_deterministic():
    a = standin_sources(["digits_caption", "parse_arith"], seed=3)
    b = standin_sources(["digits_caption", "parse_arith"], seed=3)
    for (_, tr_a, ev_a), (_, tr_b, ev_b) in zip(a, b):
        assert [y for _, y in tr_a] == [y for _, y in tr_b] and [y for _, y in ev_a] == [y for _, y in ev_b]
        np.testing.assert_array_equal(tr_a[0][0], tr_b[0][0])


def test_held_out_numbers_are_unseen_by_every_number_task(tasks):
    train, ev = number_split()
    assert not set(train) & set(ev) and len(train) + len(ev) == 1000
    held_out_en = {number_words(int(n), "en") for n in ev}
    for name in ("translate_en_de", "translate_en_fr", "speech_numbers"):
        sources = {e.reference for e in tasks[name].train} | {tasks[name].vocab.decode(e.inputs) for e in tasks[name].train
                                                             if tasks[name].spec.input_modality == "language"}
        assert not sources & held_out_en


def test_shipped_speech_file():
    numbers, feats = load_spoken_numbers()
    assert len(numbers) == len(feats) == 1000 and sorted(numbers.tolist()) == list(range(1000))
    lengths = [len(f) for f in feats]
    assert all(f.shape[1] == 40 and f.dtype == np.float32 for f in feats)
    assert 20 < np.mean(lengths) < 200
    assert abs(float(feats[0].mean())) < 1e-3  # per-utterance normalised


def test_log_mel_of_a_tone_peaks_at_its_frequency():
    rate = 16000
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate) / rate).astype(np.float32)
    feats = log_mel(tone, rate)
    assert feats.shape == (49, 40)
    fb = mel_filterbank(rate, 512)
    peak = int(np.argmax(fb[:, int(1000 / (rate / 512))]))
    assert abs(int(np.argmax(feats.mean(0))) - peak) <= 1


# ---- batches, sampler, metrics -------------------------------------------------------------------


def test_collate_pads_and_masks(tasks):
    speech = tasks["speech_numbers"]
    batch = collate(speech.spec, speech.train[:5])
    lengths = [len(e.inputs) for e in speech.train[:5]]
    assert batch.inputs.shape == (5, max(lengths), 40)
    assert batch.input_mask.sum(1).tolist() == lengths
    assert batch.target_space.tolist() == [TARGET_SPACES.index("en")] * 5
    assert (batch.targets == EOS_ID).sum() == 5
    cls = collate(tasks["digits_cls"].spec, tasks["digits_cls"].train[:3])
    assert cls.inputs.shape == (3, 8, 8, 1) and cls.targets.shape == (3,) and cls.input_mask is None


def test_joint_sampler_follows_weights_and_covers_epochs(tasks):
    chosen = [tasks[n] for n in ("digits_cls", "parse_arith", "translate_en_de")]
    sampler = JointSampler(chosen, 8, weights={"digits_cls": 3, "parse_arith": 1}, seed=0)
    counts = {}
    for _ in range(400):
        b = next(sampler)
        counts[b.task] = counts.get(b.task, 0) + 1
    assert "translate_en_de" not in counts
    assert 2.3 < counts["digits_cls"] / counts["parse_arith"] < 3.9
    one = JointSampler([tasks["translate_en_de"]], 50, seed=1)
    seen = set()
    for _ in range(len(tasks["translate_en_de"].train) // 50):
        seen |= set(one.batch_from(0).references)
    assert len(seen) == len({e.reference for e in tasks["translate_en_de"].train})
    with pytest.raises(ValueError, match="unknown task"):
        JointSampler(chosen, 8, weights={"imagenet": 1})
    with pytest.raises(ValueError, match="non-negative"):
        JointSampler(chosen, 8, weights=[0, 0, 0])


def test_metrics():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 4] = 10.0
    nll, correct, count = token_sums(logits, torch.tensor([[2, 1, 0]]))
    assert (correct, count) == (1, 2) and nll > 5
    assert exact_matches(torch.tensor([[4, 1, 0], [4, 5, 1]]), torch.tensor([[4, 1, 0], [4, 1, 0]])) == 1
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)


def test_majority_baseline_is_chance(tasks):
    cls = majority_baseline(tasks["digits_cls"])
    assert 0.05 < cls["accuracy"] < 0.2
    cap = majority_baseline(tasks["digits_caption"])
    assert cap["accuracy"] < 0.05 and set(cap) == {"accuracy", "token_accuracy", "bleu"}


def test_task_spec_validation():
    with pytest.raises(ValueError, match="num_classes"):
        TaskSpec("x", "image", "class:x", "image_label")
    with pytest.raises(ValueError, match="target_space"):
        TaskSpec("x", "language", "language", "klingon")


# ---- real-corpus loaders on local files in the corpora's formats ---------------------------------


def test_wmt_loader_reads_translation_rows(tmp_path):
    rows = [{"translation": {"de": f"Hallo Welt {i}", "en": f"Hello world {i}"}} for i in range(4)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")}
    spec, train, ev = hf.wmt("en", "de", path="json", data_files=files, limits=(3, None))
    assert spec.target_space == "de" and spec.bleu
    assert train == [(f"Hello world {i}", f"Hallo Welt {i}") for i in range(3)] and len(ev) == 4
    (task,) = build_tasks([(spec, train, ev)])
    assert task.vocab.decode(task.train[0].targets) == "Hallo Welt 0"


def test_imagenet_loader_reads_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in ("n01440764", "n01443537"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(tmp_path / split / label / f"{i}.JPEG")
    spec, train, ev = hf.imagenet(path="imagefolder", data_dir=str(tmp_path), image_size=16, num_classes=2)
    assert len(train) == len(ev) == 4
    assert train[0][0].shape == (16, 16, 3) and 0.0 <= train[0][0].min() and train[0][0].max() <= 1.0
    assert sorted(y for _, y in train) == [0, 0, 1, 1]


def test_coco_loader_reads_images_with_caption_lists(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(3)]
    captions = [["A cat on a mat.", "A cat."], ["Two dogs."], ["A red bus."]]
    ds = datasets.Dataset.from_dict({"image": images, "answer": captions},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "answer": datasets.Sequence(datasets.Value("string"))}))
    ds.to_parquet(str(tmp_path / "val.parquet"))
    files = {"val": str(tmp_path / "val.parquet"), "test": str(tmp_path / "val.parquet")}
    spec, train, ev = hf.coco_captions(path="parquet", data_files=files, image_size=8)
    assert [c for _, c in train] == ["A cat on a mat.", "Two dogs.", "A red bus."]
    assert train[0][0].shape == (8, 8, 3) and spec.input_modality == "image"


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())
    return buf.getvalue()


def test_speech_loader_reads_wav_bytes_and_decoded_arrays(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    wavs = [_wav(rng.normal(0, 1000, 8000 + 1600 * i), 16000) for i in range(3)]
    samples, rate = read_wav(wavs[0])
    assert rate == 16000 and samples.shape == (8000,)
    # a hub parquet export of an Audio column: {"bytes", "path"} structs and HF feature metadata
    table = pa.table({"audio": [{"bytes": w, "path": f"{i}.wav"} for i, w in enumerate(wavs)],
                      "text": ["HELLO WORLD", "ONE TWO", "THREE"]})
    features = {"audio": {"_type": "Audio", "sampling_rate": 16000}, "text": {"dtype": "string", "_type": "Value"}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}),
                   tmp_path / "wav.parquet")
    # already-decoded rows {"array", "sampling_rate"}
    pq.write_table(pa.table({"audio": [{"array": rng.normal(0, 0.1, 4000).tolist(), "sampling_rate": 8000}],
                             "text": ["Four"]}), tmp_path / "array.parquet")
    for name, n_train in (("wav", 3), ("array", 1)):
        files = {split: str(tmp_path / f"{name}.parquet") for split in ("train", "validation")}
        spec, train, ev = hf.wsj_speech(path="parquet", name=None, splits=("train", "validation"), data_files=files)
        assert len(train) == len(ev) == n_train and spec.input_modality == "audio"
        if name == "wav":
            assert [t for _, t in train] == ["hello world", "one two", "three"]
            assert [f.shape for f, _ in train] == [(24, 40), (29, 40), (34, 40)]  # 1 + (N - 400) // 320
        else:
            assert train[0][1] == "four" and train[0][0].shape == (24, 40)


def test_parsing_loader_linearises_ptb_trees(tmp_path):
    tree = "( (S (NP (DT The) (NN cat)) (VP (VBD sat) (PP (IN on) (NP (DT the) (NN mat)))) (. .)) )"
    assert hf.linearize_ptb(tree) == (
        "The cat sat on the mat .",
        "(S (NP DT NN )NP (VP VBD (PP IN (NP DT NN )NP )PP )VP . )S",
    )
    (tmp_path / "train.jsonl").write_text(json.dumps({"tree": tree}) + "\n")
    files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "train.jsonl")}
    spec, train, ev = hf.wsj_parsing(data_files=files)
    assert train == [hf.linearize_ptb(tree)] and spec.target_space == "parse_tree"
    with pytest.raises(ValueError, match="LDC"):
        hf.wsj_parsing()


def test_special_ids_agree_with_the_model():
    from moe_scale.models import multimodel

    assert (multimodel.PAD_ID, multimodel.EOS_ID) == (PAD_ID, EOS_ID)
