"""`MultiModelConfig`: sizes of the MultiModel, validated when built.

`MultiModelConfig()` holds the paper's base sizes (d=512, 8 heads, encoder 6 conv blocks around
an MoE layer, mixer, decoder 4 blocks with an MoE layer, k=4). `MultiModelConfig.debug()` is the
small model that trains on CPU in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from moe_scale.moe import MoEConfig

MODALITIES = ("language", "image", "audio")


@dataclass
class MultiModelConfig:
    """Options of `MultiModel`.

    d_model, num_heads        body width and attention heads (d_model % num_heads == 0)
    dropout                   after conv blocks, MoE layers and in attention
    label_smoothing           of the language and categorical losses
    vocab_size                shared language vocabulary (id 0 = padding)
    num_target_spaces         rows of the target-space (task) embedding
    class_heads               name -> number of classes, one categorical output net each
    image_channels            3 for RGB, 1 for grey
    image_stem_filters        widths of the two stem convolutions
    image_stem_stride         stride of the first stem convolution (2 in Xception)
    image_block_filters       one stride-2 Xception block per entry
    audio_bins                feature bins per frame (1 = raw waveform)
    audio_block_filters       one time-stride-2 Xception block per entry
    categorical_filters       widths of the categorical net's block and two conv steps
    encoder_blocks            conv blocks of the encoder; the MoE layer sits after the first half
    mixer_blocks              causal conv blocks after the mixer's attention
    decoder_blocks            causal conv + attention blocks; the MoE layer after block (n-1)//2
    large_kernel, large_dilation   the 15x1 convolutions of a conv block and the last one's dilation
    use_moe                   False: a dense FFN of width moe_hidden replaces each MoE layer
    num_experts, moe_k, moe_hidden, moe_router   the engine's MoELayer (paper: noisy top-k, k=4)
    moe_importance, moe_load  weights of the importance and load balancing losses
    moe_options               further MoELayer options (e.g. capacity_factor); dropless by default
    """

    d_model: int = 512
    num_heads: int = 8
    dropout: float = 0.1
    label_smoothing: float = 0.1
    vocab_size: int = 8192
    num_target_spaces: int = 32
    class_heads: dict[str, int] = field(default_factory=dict)
    image_channels: int = 3
    image_stem_filters: tuple[int, int] = (32, 64)
    image_stem_stride: int = 2
    image_block_filters: tuple[int, ...] = (128, 256, 728)
    audio_bins: int = 80
    audio_block_filters: tuple[int, ...] = (32, 64, 128)
    categorical_filters: tuple[int, int, int] = (1024, 1536, 2048)
    encoder_blocks: int = 6
    mixer_blocks: int = 2
    decoder_blocks: int = 4
    large_kernel: int = 15
    large_dilation: int = 8
    use_moe: bool = True
    num_experts: int = 30
    moe_k: int = 4
    moe_hidden: int = 2048
    moe_router: str = "noisy_topk"
    moe_importance: float = 0.01
    moe_load: float = 0.01
    moe_options: dict = field(default_factory=lambda: {"dropless": True})

    def __post_init__(self):
        for name in ("image_stem_filters", "image_block_filters", "audio_block_filters", "categorical_filters"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("d_model", "num_heads", "vocab_size", "num_target_spaces", "image_channels", "audio_bins",
                     "image_stem_stride", "large_kernel", "large_dilation", "decoder_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_blocks", "mixer_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if len(self.image_stem_filters) != 2 or len(self.categorical_filters) != 3:
            raise ValueError("image_stem_filters needs 2 widths and categorical_filters 3")
        if not self.audio_block_filters:
            raise ValueError("audio_block_filters needs at least one block")
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("dropout and label_smoothing must be in [0, 1)")
        for head, classes in self.class_heads.items():
            if ":" in head or classes < 2:
                raise ValueError(f"class head {head!r}: name without ':' and >= 2 classes, got {classes}")
        self.moe_config()  # fails here, naming the option, rather than at the first forward

    def moe_config(self) -> MoEConfig:
        """The engine config of every MoE layer of the model."""
        return MoEConfig(
            d_model=self.d_model,
            num_experts=self.num_experts,
            d_hidden=self.moe_hidden,
            k=self.moe_k,
            router=self.moe_router,
            aux_loss=dict(importance=self.moe_importance, load=self.moe_load),
            **self.moe_options,
        )

    @classmethod
    def from_dict(cls, values: dict) -> "MultiModelConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MultiModelConfig key(s) {sorted(unknown)}; see the class docstring")
        return cls(**values)

    @classmethod
    def debug(cls, **overrides) -> "MultiModelConfig":
        """A small MultiModel (~0.6M parameters) that trains on CPU in minutes.

        Sized for the stand-in tasks: 8x8 digit images keep their resolution in the stem
        (stride 1), and the sequences are short, so the large convolutions are 7 wide with
        dilation 2 instead of 15 and 8.
        """
        small = cls(
            d_model=64,
            num_heads=4,
            dropout=0.1,
            image_channels=1,
            image_stem_filters=(16, 32),
            image_stem_stride=1,
            image_block_filters=(64,),
            audio_bins=40,
            audio_block_filters=(8, 16),
            categorical_filters=(64, 96, 128),
            encoder_blocks=2,
            mixer_blocks=1,
            decoder_blocks=2,
            large_kernel=7,
            large_dilation=2,
            num_experts=8,
            moe_k=4,
            moe_hidden=128,
        )
        return replace(small, **overrides)
