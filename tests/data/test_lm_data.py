"""LM data: EOS-separated packing, byte and BPE tokenizers, local files through HF datasets,
and the run's tokenizer kept in the run directory across a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_scale.data.text import TextBlocks, _to_blocks, load_documents, pack
from moe_scale.data.tokenizer import BPETokenizer, ByteTokenizer
from tests.trainer_utils import CONFIGS, HF_CACHE, tiny


def test_pack_puts_eos_after_every_document_and_drops_the_tail():
    rows = pack([[1, 2], [3], [4, 5, 6]], eos_id=9, block_len=4)
    assert rows.tolist() == [[1, 2, 9, 3], [9, 4, 5, 6]]  # the last EOS does not fill a row


def test_byte_blocks_are_the_packing_of_byte_tokens():
    texts = ["héllo", "", "wörld!" * 3]
    fast = np.stack(_to_blocks({"text": texts}, block_len=4)["ids"])
    tok = ByteTokenizer()
    assert fast.tolist() == pack(tok.encode_batch(texts), tok.eos_id, 4).tolist()
    assert tok.decode(tok.encode("héllo")) == "héllo"


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = [{"body": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 5), "id": i}
            for i in range(60)]
    path.write_text("\n".join(json.dumps(d) for d in docs))
    return path


def test_local_json_files_and_bpe_blocks(jsonl):
    docs = load_documents("json", data_files=[str(jsonl)], text_field="body", cache_dir=str(HF_CACHE))
    assert docs.column_names == ["text"] and len(docs) == 60
    tok = BPETokenizer.train(docs["text"], vocab_size=300)
    assert 257 < tok.vocab_size <= 300 and tok.eos_id == 0
    data = TextBlocks.load(docs=docs, tokenizer=tok, seq_len=16, batch_size=4, val_fraction=0.1)
    x, y = data.next_train_batch()
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < tok.vocab_size
    # the training stream is the training documents, each followed by EOS, in order
    train_ids = np.concatenate([np.asarray(r) for r in data.train["ids"]]).tolist()
    eos_at = [i for i, t in enumerate(train_ids) if t == tok.eos_id]
    pieces = [tok.decode(train_ids[a + 1 : b]) for a, b in zip([-1, *eos_at], eos_at)]
    train_docs = [t for t in docs["text"] if t in pieces]
    assert len(pieces) > 40 and pieces == train_docs  # whole documents, in corpus order, EOS between
    with pytest.raises(ValueError, match="set data.text_field"):
        load_documents("json", data_files=[str(jsonl)], text_field="missing", cache_dir=str(HF_CACHE))
    with pytest.raises(FileNotFoundError, match="data.data_files"):
        load_documents("json", data_files=[str(jsonl) + ".nope"])


def test_the_run_keeps_its_tokenizer_on_resume(tmp_path, jsonl):
    from moe_scale.train.config import load_config
    from moe_scale.train.trainer import Trainer

    run = tmp_path / "run"
    common = ["model.vocab_size=300", "data.tokenizer=bpe", "data.dataset=json", f"data.data_files=[{jsonl}]",
              "data.text_field=body", "data.max_documents=null", "data.val_fraction=0.1", "data.seq_len=16",
              "model.max_seq_len=16"]
    Trainer(load_config(CONFIGS / "lm_debug.yaml", tiny(run, *common, "train.max_steps=3"))).fit()
    saved = (run / "tokenizer.json").read_text()
    # a resume that would fit a different tokenizer (fewer documents) reads the saved one instead
    t = Trainer(load_config(CONFIGS / "lm_debug.yaml", tiny(run, *common, "train.max_steps=4",
                                                               "data.bpe_max_documents=5")))
    assert t.step == 3 and (run / "tokenizer.json").read_text() == saved
    assert t.task.bytes_per_token > 1.5  # merges: several bytes per token
    t.fit()


def test_a_given_tokenizer_json_is_copied_into_the_run_and_checked_against_the_vocabulary(tmp_path, jsonl):
    from moe_scale.train.config import load_config
    from moe_scale.validation import ConfigError
    from moe_scale.train.trainer import Trainer

    small = BPETokenizer.train([jsonl.read_text()], vocab_size=280)
    small.save(tmp_path / "small.json")
    Trainer(load_config(CONFIGS / "lm_debug.yaml", tiny(tmp_path / "ok", "model.vocab_size=300", "data.tokenizer=bpe",
                                                        f"data.tokenizer_path={tmp_path / 'small.json'}")))
    assert (tmp_path / "ok" / "tokenizer.json").read_text() == (tmp_path / "small.json").read_text()

    big = BPETokenizer.train([jsonl.read_text()], vocab_size=400)
    big.save(tmp_path / "big.json")
    cfg = load_config(CONFIGS / "lm_debug.yaml", tiny(tmp_path / "run", "model.vocab_size=300", "data.tokenizer=bpe",
                                                      f"data.tokenizer_path={tmp_path / 'big.json'}"))
    with pytest.raises(ConfigError, match=f"set model.vocab_size={big.vocab_size}"):
        Trainer(cfg)
