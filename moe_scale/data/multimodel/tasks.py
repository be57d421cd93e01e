"""Tasks, examples and batches of the MultiModel, independent of where the data comes from.

A task source (the offline stand-ins in `standins.py`, the real corpora in `hf.py`) yields a
`TaskSpec` and raw examples `(input, target)`: input is a text, an image `[H, W, C]` in [0, 1]
or audio features `[T, F]`; target is a text or a class id. `build_tasks` builds one shared
vocabulary over the training texts of all the tasks and encodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from moe_scale.data.multimodel.vocab import PAD_ID, Vocab

# Target spaces (the task token that starts the decoder, paper section 2.4): what to produce.
TARGET_SPACES = ("generic", "en", "de", "fr", "parse_tree", "image_label")

RawExample = tuple  # (input: str | np.ndarray, target: str | int)


@dataclass(frozen=True)
class TaskSpec:
    """What a task maps from and to.

    input_modality    "language", "image" or "audio"
    target_modality   "language" or "class:<head>"
    target_space      name in TARGET_SPACES: the decoder's first input
    num_classes       classes of a "class:" target
    bleu              report BLEU (translation, captioning)
    """

    name: str
    input_modality: str
    target_modality: str
    target_space: str
    num_classes: int = 0
    bleu: bool = False
    description: str = ""

    def __post_init__(self):
        if self.input_modality not in ("language", "image", "audio"):
            raise ValueError(f"task {self.name}: input_modality must be language, image or audio")
        if self.target_space not in TARGET_SPACES:
            raise ValueError(f"task {self.name}: target_space must be one of {TARGET_SPACES}")
        if self.target_modality.startswith("class:") != (self.num_classes > 0):
            raise ValueError(f"task {self.name}: a 'class:<head>' target needs num_classes > 0 and only it")
        if self.target_modality != "language" and not self.target_modality.startswith("class:"):
            raise ValueError(f"task {self.name}: target_modality must be 'language' or 'class:<head>'")

    @property
    def is_classification(self) -> bool:
        return self.num_classes > 0

    @property
    def head(self) -> str:
        """Name of the categorical output net ("" for language targets)."""
        return self.target_modality.removeprefix("class:") if self.is_classification else ""


@dataclass
class Example:
    """inputs: int64 ids `[S]` / float32 image `[H, W, C]` / float32 features `[T, F]`;
    targets: int64 ids `[T]` ending in EOS, or an int class; reference: target text."""

    inputs: np.ndarray
    targets: np.ndarray | int
    reference: str = ""


@dataclass
class Task:
    spec: TaskSpec
    train: list[Example]
    eval: list[Example]
    vocab: Vocab

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Batch:
    """One task's batch, the fields `MultiModel.loss` reads.

    inputs        ids `[B, S]` (0 = padding) / images `[B, H, W, C]` / features `[B, T, F]`
    input_mask    `[B, T]` for audio (True = real frame), else None
    targets       ids `[B, T]` (0 = padding) or labels `[B]`
    target_space  `[B]` index into TARGET_SPACES
    """

    task: str
    input_modality: str
    target_modality: str
    inputs: Tensor
    input_mask: Tensor | None
    targets: Tensor
    target_space: Tensor
    references: list[str] = field(default_factory=list)

    def to(self, device) -> "Batch":
        mask = None if self.input_mask is None else self.input_mask.to(device)
        return Batch(
            self.task, self.input_modality, self.target_modality, self.inputs.to(device), mask,
            self.targets.to(device), self.target_space.to(device), self.references,
        )


def pad_sequences(seqs: Sequence[np.ndarray], pad_value=0) -> tuple[np.ndarray, np.ndarray]:
    """`[L_i, ...]` arrays -> (`[B, max L, ...]` padded, mask `[B, max L]`)."""
    longest = max(len(s) for s in seqs)
    out = np.full((len(seqs), longest, *seqs[0].shape[1:]), pad_value, dtype=seqs[0].dtype)
    mask = np.zeros((len(seqs), longest), dtype=bool)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return out, mask


def collate(spec: TaskSpec, examples: Sequence[Example]) -> Batch:
    """Stack and pad examples of one task into a `Batch` of CPU tensors."""
    mask = None
    if spec.input_modality == "language":
        inputs = torch.from_numpy(pad_sequences([e.inputs for e in examples], PAD_ID)[0])
    elif spec.input_modality == "image":
        inputs = torch.from_numpy(np.stack([e.inputs for e in examples]))
    else:
        feats, mask_np = pad_sequences([e.inputs for e in examples], 0.0)
        inputs, mask = torch.from_numpy(feats), torch.from_numpy(mask_np)
    if spec.is_classification:
        targets = torch.tensor([int(e.targets) for e in examples], dtype=torch.long)
    else:
        targets = torch.from_numpy(pad_sequences([e.targets for e in examples], PAD_ID)[0])
    space = torch.full((len(examples),), TARGET_SPACES.index(spec.target_space), dtype=torch.long)
    return Batch(spec.name, spec.input_modality, spec.target_modality, inputs, mask, targets, space,
                 [e.reference for e in examples])


def encode_examples(spec: TaskSpec, raw: Sequence[RawExample], vocab: Vocab) -> list[Example]:
    out = []
    for x, y in raw:
        x_arr = np.asarray(vocab.encode(x), dtype=np.int64) if spec.input_modality == "language" else np.asarray(x, np.float32)
        if spec.is_classification:
            out.append(Example(x_arr, int(y), str(y)))
        else:
            out.append(Example(x_arr, np.asarray(vocab.encode(y), dtype=np.int64), y))
    return out


def build_tasks(
    sources: Sequence[tuple[TaskSpec, Sequence[RawExample], Sequence[RawExample]]],
    vocab: Vocab | None = None,
    max_vocab: int | None = None,
) -> list[Task]:
    """Encode raw tasks with one shared vocabulary (built from all training texts if not given)."""
    names = [spec.name for spec, _, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    if vocab is None:
        texts = []
        for spec, train, _ in sources:
            for x, y in train:
                texts += [x] if spec.input_modality == "language" else []
                texts += [] if spec.is_classification else [y]
        vocab = Vocab.build(texts, max_size=max_vocab)
    return [Task(spec, encode_examples(spec, train, vocab), encode_examples(spec, ev, vocab), vocab)
            for spec, train, ev in sources]
