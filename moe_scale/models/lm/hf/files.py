"""Reading and writing Hugging Face checkpoint directories: config.json, safetensors, tokenizer.

    ckpt = HFCheckpoint.open(hf_dir)          # config dict, tensor names, lazy reads
    tensor = ckpt.get("model.norm.weight")
    write_hf_dir(out_dir, config, tensors)    # config.json + model.safetensors
    copy_tokenizer(src_dir, dst_dir)          # tokenizer.json, tokenizer_config.json, ...

Weights are read only from safetensors (one file, or shards listed by
model.safetensors.index.json): a pickled `pytorch_model.bin` is refused, since unpickling
it could run code. config.json is parsed as JSON; nothing in the directory is executed
(`auto_map` / remote code is never used: only the families of config.py convert).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from moe_scale.models.lm.hf.config import ConversionError

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / "config.yaml").is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return value


@dataclass
class HFCheckpoint:
    """An HF checkpoint directory: `config` (config.json) and where each tensor lives."""

    root: Path
    config: dict[str, Any]
    file_of: dict[str, Path]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | Path) -> "HFCheckpoint":
        root = Path(root)
        if not (root / "config.json").is_file():
            raise ConversionError(f"{root} holds no config.json: give a Hugging Face checkpoint directory "
                                  f"(save_pretrained's output)")
        config = read_json(root / "config.json")
        if (root / INDEX).is_file():
            weight_map = read_json(root / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{root / INDEX} has no weight_map")
            file_of = {name: root / Path(file).name for name, file in weight_map.items()}
        elif (root / SAFETENSORS).is_file():
            file_of = dict.fromkeys(_names_in(root / SAFETENSORS), root / SAFETENSORS)
        else:
            pickled = [p.name for p in root.glob("*.bin")]
            hint = (f" ({', '.join(pickled)} is pickled, which could run code on loading: re-save it with "
                    f"save_pretrained(..., safe_serialization=True))" if pickled else "")
            raise ConversionError(f"{root} holds no {SAFETENSORS} or {INDEX}{hint}")
        missing = sorted({str(p.name) for p in file_of.values() if not p.is_file()})
        if missing:
            raise ConversionError(f"{root} lacks the shard(s) {', '.join(missing)} its {INDEX} lists")
        return cls(root, config, file_of)

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)


def _names_in(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def write_hf_dir(out: str | Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """config.json and one model.safetensors (metadata format=pt, as transformers expects)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / SAFETENSORS), metadata={"format": "pt"})
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of `src` that exist into `dst`; return their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
