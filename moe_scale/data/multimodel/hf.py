"""Real-corpus paths of the MultiModel tasks through HF `datasets` (hub names or local files).

    loader          paper corpus     default hub dataset                 row format read
    wmt             WMT'14 EN-DE/FR  wmt/wmt14 ("de-en", "fr-en")        {"translation": {src: str, tgt: str}}
    imagenet        ImageNet         ILSVRC/imagenet-1k (gated)          {"image": PIL, "label": int}
    coco_captions   MS-COCO          lmms-lab/COCO-Caption               {"image": PIL, "answer": [str] or str}
    wsj_speech      WSJ speech       none public (WSJ is LDC93S6B); the  {"audio": {"array", "sampling_rate"}
                                     default is openslr/librispeech_asr   or {"bytes"/"path"} of WAV, "text": str}
    wsj_parsing     WSJ / PTB trees  none public (PTB is LDC99T42)       {"tree": "(S (NP ...) ...)", ["sentence"]}

Each loader returns `(spec, train, eval)` raw examples like the stand-ins, ready for
`build_tasks`. Pass `path="json" / "parquet" / "imagefolder"` with `data_files=` or `data_dir=`
to read local copies; nothing then touches the hub. Rows are streamed, so `limit` reads only
the first rows of a large corpus. Audio columns are read undecoded and WAV is decoded here, so
hub parquet exports need no `torchcodec` (datasets' "audiofolder" builder still does).
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np

from moe_scale.data.multimodel.audio import log_mel, normalize, read_wav
from moe_scale.data.multimodel.tasks import RawExample, TaskSpec

Source = tuple[TaskSpec, list[RawExample], list[RawExample]]


def stream_rows(path: str, name: str | None = None, split: str = "train", limit: int | None = None, **kwargs):
    """The first `limit` rows of a split (all rows if None), streamed through `datasets.load_dataset`."""
    from datasets import Audio, load_dataset

    ds = load_dataset(path, name, split=split, streaming=True, **kwargs)
    for column, feature in (ds.features or {}).items():
        if isinstance(feature, Audio):  # read the bytes; `decode_audio` decodes WAV without torchcodec
            ds = ds.cast_column(column, Audio(decode=False))
    return islice(iter(ds), limit)


def _splits(convert, path, name, splits, limits, kwargs) -> tuple[list, list]:
    out = []
    for split, limit in zip(splits, limits):
        out.append([x for row in stream_rows(path, name, split, limit, **kwargs) if (x := convert(row))])
    return out[0], out[1]


def wmt(src: str = "en", tgt: str = "de", path: str = "wmt/wmt14", name: str | None = None,
        splits=("train", "validation"), limits=(None, None), **kwargs) -> Source:
    """WMT translation src -> tgt; `name` defaults to the pair's config, e.g. "de-en"."""
    other = tgt if src == "en" else src
    name = name if name is not None or path in ("json", "parquet", "csv") else f"{other}-en"
    spec = TaskSpec(f"wmt_{src}_{tgt}", "language", "language", tgt if tgt in ("en", "de", "fr") else "generic",
                    bleu=True, description=f"WMT {src} -> {tgt}")
    train, ev = _splits(lambda r: (r["translation"][src], r["translation"][tgt]), path, name, splits, limits, kwargs)
    return spec, train, ev


def image_array(image, size: int) -> np.ndarray:
    """PIL image (or array) -> float32 RGB `[size, size, 3]` in [0, 1]."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def imagenet(path: str = "ILSVRC/imagenet-1k", name: str | None = None, image_size: int = 64,
             num_classes: int = 1000, splits=("train", "validation"), limits=(None, None),
             image_column: str = "image", label_column: str = "label", **kwargs) -> Source:
    spec = TaskSpec("imagenet", "image", "class:imagenet", "image_label", num_classes=num_classes,
                    description=f"ImageNet {image_size}x{image_size} RGB -> class")

    def convert(row):
        return image_array(row[image_column], image_size), int(row[label_column])

    train, ev = _splits(convert, path, name, splits, limits, kwargs)
    return spec, train, ev


def coco_captions(path: str = "lmms-lab/COCO-Caption", name: str | None = None, image_size: int = 64,
                  splits=("val", "test"), limits=(None, None), image_column: str = "image",
                  caption_column: str = "answer", **kwargs) -> Source:
    """Image -> its first caption (a list column holds several references)."""

    def convert(row):
        caption = row[caption_column]
        caption = caption[0] if isinstance(caption, (list, tuple)) else caption
        return (image_array(row[image_column], image_size), caption.strip()) if caption else None

    spec = TaskSpec("coco_captions", "image", "language", "en", bleu=True, description="MS-COCO image -> caption")
    train, ev = _splits(convert, path, name, splits, limits, kwargs)
    return spec, train, ev


def decode_audio(value) -> tuple[np.ndarray, int]:
    """An HF audio cell -> (samples `[N]`, sample rate): decoded arrays, or WAV bytes / path."""
    if isinstance(value, dict) and value.get("array") is not None:
        return np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    data = value.get("bytes") if isinstance(value, dict) else None
    if data is None:
        data = Path(value["path"] if isinstance(value, dict) else value).read_bytes()
    if data[:4] != b"RIFF":
        try:
            import soundfile
        except ImportError as e:
            raise ImportError("non-WAV audio (e.g. FLAC) needs `pip install soundfile`") from e
        import io

        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples[:, 0], int(rate)
    return read_wav(data)


def wsj_speech(path: str = "openslr/librispeech_asr", name: str | None = "clean",
               splits=("train.100", "validation"), limits=(None, None), audio_column: str = "audio",
               text_column: str = "text", **kwargs) -> Source:
    """Speech -> lower-cased transcript, as 40-bin log-mel features (the stand-in's featuriser)."""

    def convert(row):
        samples, rate = decode_audio(row[audio_column])
        return normalize(log_mel(samples, rate)), row[text_column].lower().strip()

    spec = TaskSpec("wsj_speech", "audio", "language", "en", description="speech -> transcript (log-mel)")
    train, ev = _splits(convert, path, name, splits, limits, kwargs)
    return spec, train, ev


def parse_tree(text: str):
    """Bracketed tree "(S (NP (DT the) (NN cat)) ...)" -> nested (label, children) / leaf str."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def node():
        nonlocal pos
        if tokens[pos] != "(":
            pos += 1
            return tokens[pos - 1]
        pos += 1
        label = tokens[pos] if tokens[pos] not in "()" else ""
        pos += 1 if label else 0
        children = []
        while tokens[pos] != ")":
            children.append(node())
        pos += 1
        return label, children

    tree = node()
    if tree[0] == "" and len(tree[1]) == 1:  # PTB's unlabelled root "( (S ...) )"
        tree = tree[1][0]
    return tree


def linearize_ptb(text: str) -> tuple[str, str]:
    """PTB tree -> (sentence, linearised tree) as in Vinyals et al. 2015, used by the paper:
    "(S (NP (DT the) (NN cat)) (VP (VBD sat)))" -> ("the cat sat", "(S (NP DT NN )NP (VP VBD )VP )S")."""
    words, out = [], []

    def walk(t):
        label, children = t
        if len(children) == 1 and isinstance(children[0], str):
            words.append(children[0])
            out.append(label)
            return
        out.append(f"({label}")
        for c in children:
            walk(c)
        out.append(f"){label}")

    walk(parse_tree(text))
    return " ".join(words), " ".join(out)


def wsj_parsing(path: str = "json", name: str | None = None, splits=("train", "validation"),
                limits=(None, None), tree_column: str = "tree", **kwargs) -> Source:
    """Sentence -> linearised PTB tree; the sentence is read from the tree's leaves."""
    if path == "json" and "data_files" not in kwargs and "data_dir" not in kwargs:
        raise ValueError("the WSJ treebank is LDC-licensed and not on the hub: pass data_files= with "
                         "jsonl/parquet rows holding a bracketed 'tree' column")
    spec = TaskSpec("wsj_parsing", "language", "language", "parse_tree", description="sentence -> linearised tree")
    train, ev = _splits(lambda r: linearize_ptb(r[tree_column]), path, name, splits, limits, kwargs)
    return spec, train, ev


LOADERS = {"wmt": wmt, "imagenet": imagenet, "coco_captions": coco_captions, "wsj_speech": wsj_speech,
           "wsj_parsing": wsj_parsing}
