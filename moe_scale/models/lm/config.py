"""The `model:` and `data:` sections of the `lm` client, validated when built.

`arch` picks the family and fills in every feature switch left null:

    arch     position  norm       ffn_activation  meaning
    gpt2     learned   layernorm  gelu            the byte-level 2017-style model (the default)
    llama    rope      rmsnorm    swiglu          Llama / Mixtral / OLMoE / DeepSeek-V3 blocks

A switch set explicitly wins over the arch's value, so `arch: llama, norm: layernorm` is allowed.
Grouped-query attention (`n_kv_heads`), QK-norm and dense-first layers are
independent of the arch. The routed experts' activation is `moe.activation` (swiglu for the
modern presets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_scale.validation import check, check_choice

ARCHS = {
    "gpt2": {"position": "learned", "norm": "layernorm", "ffn_activation": "gelu"},
    "llama": {"position": "rope", "norm": "rmsnorm", "ffn_activation": "swiglu"},
}
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
FFN_ACTIVATIONS = ("gelu", "swiglu")
TOKENIZERS = ("byte", "bpe")
QK_NORM_SCOPES = ("head", "projection")


@dataclass
class LMConfig:
    """The `lm` client: a decoder-only transformer whose FFNs are dense or MoE (models/lm).

    arch              gpt2 or llama: defaults of position, norm and ffn_activation (table above)
    vocab_size        byte tokenizer: >= 256; bpe: the size the tokenizer is trained to (or
                      at least the size of a loaded tokenizer.json)
    n_kv_heads        key/value heads (grouped-query attention); null: n_heads (full MHA)
    head_dim          size of each attention head; null: d_model / n_heads (Qwen3-MoE sets it apart)
    qk_norm           RMSNorm over the queries and keys before RoPE (OLMoE, Qwen3)
    qk_norm_scope     head: one norm of width head_dim per head (Qwen3); projection: one norm over
                      all heads' concatenated queries (and keys) as projected (OLMoE)
    qkv_bias          bias on the query / key / value projection only (Qwen2); null: model.bias
    rope_theta        RoPE base
    norm_eps          epsilon of every LayerNorm / RMSNorm
    d_ff              hidden size of the dense FFNs (default: 4 * d_model for gelu,
                      8/3 * d_model rounded up to a multiple of 64 for swiglu)
    n_dense_layers    the first n layers have dense FFNs (DeepSeek-V3 keeps 3); MoE after
    moe_every         among the layers after n_dense_layers: 1 every FFN is MoE; 2 every other
                      (the 2nd, 4th, ...); 0 a dense model
    tie_embeddings    the output projection shares the token embedding matrix
    init_from         a converted moe_scale run directory or a Hugging Face checkpoint directory
                      whose weights a run starts from at step 0 (fine-tuning; moe_scale/models/lm/hf)
    upcycle_from      a dense Hugging Face (Llama / Qwen2 style) or moe_scale run directory: every
                      MoE layer's experts start as copies of that layer's dense FFN, routers fresh
    upcycle_noise     relative std of Gaussian noise added to each copied expert weight
    """

    name: str = "lm"
    arch: str = "gpt2"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    max_seq_len: int = 256
    position: str | None = None
    norm: str | None = None
    ffn_activation: str | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    qkv_bias: bool | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    d_ff: int | None = None
    n_dense_layers: int = 0
    moe_every: int = 1
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    init_from: str | None = None
    upcycle_from: str | None = None
    upcycle_noise: float = 0.0

    def __post_init__(self):
        check_choice("model.name", self.name, ("lm",))
        check_choice("model.arch", self.arch, tuple(ARCHS))
        for key, value in ARCHS[self.arch].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_choice("model.position", self.position, POSITIONS)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.ffn_activation", self.ffn_activation, FFN_ACTIVATIONS)
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0,
                  f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                  f"choose n_heads dividing d_model, or set model.head_dim")
            self.head_dim = self.d_model // self.n_heads
        check(self.head_dim >= 1, f"model.head_dim must be >= 1 or null, got {self.head_dim}")
        check_choice("model.qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check(1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
              f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
              f"(grouped-query attention shares each key/value head among n_heads / n_kv_heads query heads)")
        check(self.position != "rope" or self.head_dim % 2 == 0,
              f"model.position=rope needs an even head size, got model.head_dim = {self.head_dim}; "
              f"change model.n_heads or model.head_dim")
        check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        check(self.d_ff is None or self.d_ff >= 1, f"model.d_ff must be >= 1 or null, got {self.d_ff}")
        check(0 <= self.n_dense_layers <= self.n_layers,
              f"model.n_dense_layers must be in [0, model.n_layers={self.n_layers}], got {self.n_dense_layers}")
        check(self.moe_every >= 0, f"model.moe_every must be >= 0 (0 = dense model), got {self.moe_every}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check(self.init_from is None or self.upcycle_from is None,
              "model.init_from and model.upcycle_from both give the starting weights; keep one of them")
        check(self.upcycle_noise >= 0, f"model.upcycle_noise must be >= 0, got {self.upcycle_noise}")
        check(self.upcycle_noise == 0 or self.upcycle_from is not None,
              "model.upcycle_noise applies to upcycling: set model.upcycle_from, or drop model.upcycle_noise")

    @property
    def dense_hidden(self) -> int:
        """Hidden size of the dense FFNs (SwiGLU keeps the parameters of a 4d GELU FFN, as Llama)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn_activation == "swiglu":
            return math.ceil(8 * self.d_model / 3 / 64) * 64
        return 4 * self.d_model

    def is_moe_layer(self, layer: int) -> bool:
        i = layer - self.n_dense_layers
        return self.moe_every > 0 and i >= 0 and i % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))


@dataclass
class LMDataConfig:
    """Text data through HF `datasets`, byte or BPE tokens, documents packed into blocks.

    dataset        "python-stdlib": the running Python's standard-library sources (offline);
                   anything else is passed to `datasets.load_dataset` (hub name, local
                   directory, or a builder such as "text" / "json" / "parquet" with data_files)
    data_files     local files for the builder named by `dataset` (e.g. dataset: json)
    tokenizer      byte: UTF-8 bytes, NUL between documents; bpe: byte-level BPE trained with
                   HF `tokenizers` on the training split (model.vocab_size tokens), or loaded
                   from tokenizer_path; either way saved as RUN_DIR/tokenizer.json and reused
                   from there on resume
    tokenizer_path a tokenizer.json to use instead of training one (tokenizer: bpe); unset, the
                   tokenizer.json of model.init_from / upcycle_from when that directory has one
    bpe_max_documents  training documents the BPE tokenizer is fitted on (null: all)
    val_fraction   share of documents in the validation split (chosen by a hash of the text)
    batch_size     blocks per rank per micro-step
    """

    dataset: str = "python-stdlib"
    dataset_config: str | None = None
    data_files: tuple[str, ...] = ()
    split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    tokenizer: str = "byte"
    tokenizer_path: str | None = None
    bpe_max_documents: int | None = None
    val_fraction: float = 0.05
    seq_len: int = 128
    batch_size: int = 16
    cache_dir: str | None = None

    def __post_init__(self):
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        check(self.tokenizer_path is None or self.tokenizer == "bpe",
              "data.tokenizer_path is a BPE tokenizer.json: set data.tokenizer=bpe, or drop data.tokenizer_path")
        check(self.bpe_max_documents is None or self.bpe_max_documents >= 1,
              f"data.bpe_max_documents must be >= 1 or null, got {self.bpe_max_documents}")
        check(self.seq_len >= 1, f"data.seq_len must be >= 1, got {self.seq_len}")
        check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        check(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.max_documents is None or self.max_documents >= 2,
              f"data.max_documents must be >= 2 (train and validation) or null, got {self.max_documents}")
        check(not self.data_files or self.dataset != "python-stdlib",
              "data.data_files needs a builder in data.dataset (text, json, csv or parquet), "
              "not the shipped python-stdlib corpus")
