"""The MultiModel: modality nets around a shared encoder / I/O mixer / decoder with MoE layers."""

from moe_scale.models.multimodel.config import MultiModelConfig
from moe_scale.models.multimodel.model import EOS_ID, MultiModel, MultiModelOutput
from moe_scale.models.multimodel.modalities import PAD_ID

__all__ = ["EOS_ID", "PAD_ID", "MultiModel", "MultiModelConfig", "MultiModelOutput"]
