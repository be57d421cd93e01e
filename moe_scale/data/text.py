"""Language-model data on HF `datasets`: documents -> tokens -> packed blocks -> batches.

    data = TextBlocks.load(dataset="python-stdlib", seq_len=128, batch_size=16)
    x_BT, y_BT = data.next_train_batch()        # int64, y is x shifted by one token

The default corpus, "python-stdlib", is the running Python's own standard-library sources
(top-level `*.py` files), read with the `text` loader one document per file: it is on every
machine, needs no download and stays the same run to run. Any other name goes to
`datasets.load_dataset` (a hub dataset for cluster users, a local directory, or a builder such
as "json" with `data_files`).

Documents go to the validation split when a CRC32 of their text falls below `val_fraction`,
so the split depends on nothing but the documents. Each split is tokenized (UTF-8 bytes by
default, or a BPE tokenizer from `moe_scale.data.tokenizer`), packed into one stream with the
end-of-document id after every document, and cut into non-overlapping blocks of seq_len + 1
tokens, so a block may hold the end of one document, EOS, and the start of the next.

Training order: one seeded permutation of the blocks per epoch, dealt out to ranks; the
position in it is `(epoch, cursor)`, saved in checkpoints for an exact resume.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib

import numpy as np
import torch
from torch import Tensor

STDLIB = "python-stdlib"
DOC_SEPARATOR = 0  # the byte tokenizer's EOS: NUL never occurs in text, so the model can learn "a new document starts"
_HASH_BUCKETS = 1_000_000


def stdlib_files() -> list[str]:
    """The standard library's top-level Python sources, sorted (168 files, 4.7 MB on 3.11)."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def load_documents(dataset: str = STDLIB, dataset_config: str | None = None, split: str = "train",
                   text_field: str = "text", max_documents: int | None = None, cache_dir: str | None = None,
                   data_files: list[str] | tuple[str, ...] = ()):
    """A `datasets.Dataset` with one column "text", one row per document.

    With `data_files`, `dataset` names the builder that reads them ("text" reads one document per
    file, "json" / "csv" / "parquet" one per row).
    """
    import datasets

    datasets.disable_progress_bars()
    if dataset == STDLIB:
        ds = datasets.load_dataset("text", data_files=stdlib_files(), sample_by="document", split="train",
                                   cache_dir=cache_dir)
    elif data_files:
        missing = [f for f in data_files if not glob.glob(f)]
        if missing:
            raise FileNotFoundError(f"data.data_files: no file matches {missing}")
        extra = {"sample_by": "document"} if dataset == "text" else {}
        ds = datasets.load_dataset(dataset, dataset_config, data_files=list(data_files), split=split,
                                   cache_dir=cache_dir, **extra)
    else:
        ds = datasets.load_dataset(dataset, dataset_config, split=split, cache_dir=cache_dir)
    if dataset != STDLIB:
        if text_field not in ds.column_names:
            raise ValueError(f"dataset {dataset!r} has no column {text_field!r} (columns: {ds.column_names}); "
                             f"set data.text_field")
        ds = ds.select_columns([text_field])
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds


def is_validation(text: str, val_fraction: float) -> bool:
    return zlib.crc32(text.encode("utf-8")) % _HASH_BUCKETS < val_fraction * _HASH_BUCKETS


def _in_split(batch: dict, val_fraction: float, want_val: bool) -> list[bool]:
    return [is_validation(t, val_fraction) == want_val for t in batch["text"]]


def pack(token_lists: list[list[int]], eos_id: int, block_len: int) -> np.ndarray:
    """Documents' ids -> one stream with `eos_id` after each document -> rows `[n, block_len]`.

    The tail that does not fill a row is dropped.
    """
    stream = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int64)
    n = len(stream) // block_len
    return stream[: n * block_len].reshape(n, block_len)


def _to_blocks(batch: dict, block_len: int, tokenizer=None) -> dict:
    """A batch of documents -> packed blocks of `block_len` token ids (see `pack`)."""
    if tokenizer is None:  # bytes: the same layout as `pack` with the NUL byte as EOS, without a Python loop
        stream = bytearray()
        for text in batch["text"]:
            stream += text.encode("utf-8")
            stream.append(DOC_SEPARATOR)
        n = len(stream) // block_len
        blocks = np.frombuffer(bytes(stream[: n * block_len]), dtype=np.uint8).reshape(n, block_len)
    else:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
        blocks = pack(tokenizer.encode_batch(batch["text"]), tokenizer.eos_id, block_len).astype(dtype)
    return {"ids": list(blocks)}


def to_blocks(docs, seq_len: int, val_fraction: float, want_val: bool, tokenizer=None):
    """The train or validation split of `docs` as a Dataset of token blocks `ids` [seq_len + 1].

    tokenizer  None: UTF-8 bytes; else a BPE tokenizer (`moe_scale.data.tokenizer`)
    """
    part = split_documents(docs, val_fraction, want_val)
    kwargs = dict(block_len=seq_len + 1)
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    blocks = part.map(_to_blocks, batched=True, batch_size=1000, remove_columns=part.column_names,
                      fn_kwargs=kwargs)
    return blocks.with_format("numpy")


def split_documents(docs, val_fraction: float, want_val: bool):
    """The documents of the training (want_val=False) or validation split."""
    return docs.filter(_in_split, batched=True, fn_kwargs=dict(val_fraction=val_fraction, want_val=want_val))


class BlockSampler:
    """Seeded per-epoch permutation of `num_blocks`, each rank taking every world-th entry.

    Every rank sees `num_blocks // world` blocks per epoch and the same number of batches.
    State is `(epoch, cursor)`; the order depends only on the seed, so restoring the state
    restores the stream exactly.
    """

    def __init__(self, num_blocks: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.per_rank = num_blocks // world
        if self.per_rank < batch_size:
            raise ValueError(
                f"the training split has {num_blocks} blocks, too few for {world} rank(s) x batch_size "
                f"{batch_size}; lower data.batch_size or data.seq_len, or use more documents"
            )
        self.num_blocks, self.batch_size, self.rank, self.world, self.seed = num_blocks, batch_size, rank, world, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_blocks, generator=g)
        return perm[self.rank :: self.world][: self.per_rank]

    def next_indices(self) -> list[int]:
        if self.cursor + self.batch_size > self.per_rank:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx.tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()


def _batch(blocks, indices: list[int]) -> tuple[Tensor, Tensor]:
    ids_BL = torch.from_numpy(np.stack(blocks[indices]["ids"]).astype(np.int64))
    return ids_BL[:, :-1], ids_BL[:, 1:]


class TextBlocks:
    """Train and validation token blocks with a resumable training order.

    `next_train_batch()` -> (x_BT, y_BT) int64 `[batch_size, seq_len]`.
    `val_batches(n)` -> the first n validation batches of this rank (the same every call).
    """

    def __init__(self, train, val, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.train, self.val, self.batch_size = train, val, batch_size
        self.rank, self.world = rank, world
        if len(val) == 0:
            raise ValueError("the validation split is empty; raise data.val_fraction or use more documents")
        self.sampler = BlockSampler(len(train), batch_size, rank, world, seed)

    @classmethod
    def load(cls, *, dataset: str = STDLIB, dataset_config: str | None = None, split: str = "train",
             text_field: str = "text", max_documents: int | None = None, val_fraction: float = 0.05,
             seq_len: int = 128, batch_size: int = 16, cache_dir: str | None = None,
             rank: int = 0, world: int = 1, seed: int = 0, data_files: tuple[str, ...] = (),
             docs=None, tokenizer=None) -> "TextBlocks":
        """docs: documents already loaded (else read with `load_documents`); tokenizer: None for bytes."""
        if docs is None:
            docs = load_documents(dataset, dataset_config, split, text_field, max_documents, cache_dir, data_files)
        train = to_blocks(docs, seq_len, val_fraction, want_val=False, tokenizer=tokenizer)
        val = to_blocks(docs, seq_len, val_fraction, want_val=True, tokenizer=tokenizer)
        return cls(train, val, batch_size, rank, world, seed)

    def next_train_batch(self) -> tuple[Tensor, Tensor]:
        return _batch(self.train, self.sampler.next_indices())

    def val_batches(self, n: int):
        """Up to n batches, rank-strided over the validation blocks in order; wraps if too few."""
        total = len(self.val)
        for b in range(n):
            start = (b * self.world + self.rank) * self.batch_size
            yield _batch(self.val, [(start + i) % total for i in range(self.batch_size)])

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
