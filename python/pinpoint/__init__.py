"""pinpoint: locate and fine-tune the attention heads behind one behaviour of a causal LM."""

__version__ = "0.1.0"

from .models import ModelAdapter, UnsupportedArchitectureError, adapter_for

__all__ = ["__version__", "ModelAdapter", "UnsupportedArchitectureError", "adapter_for"]
