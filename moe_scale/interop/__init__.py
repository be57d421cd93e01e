"""Interoperability with other model formats (Hugging Face: `moe_scale.interop.hf`)."""
