"""pinpoint: locate and fine-tune the attention heads behind one behaviour of a causal LM."""

__version__ = "0.1.0"

from . import data, organism
from .adapter import AdapterMismatchError, PinpointAdapter, attach, random_heads
from .evaluate import EvalReport, evaluate
from .general import evaluate_choices, kl_divergence
from .heads import HeadScores, HeadSet
from .locate import KnockoutCurve, knockout, locate
from .models import ModelAdapter, ModelSpec, UnsupportedArchitectureError, adapter_for, spec_for  # ModelAdapter, adapter_for: deprecated aliases
from .patching import ablate, head_means
from .prompts import PromptPair
from .tune import FullTuning, tune

__all__ = [
    "__version__",
    "AdapterMismatchError",
    "FullTuning",
    "PinpointAdapter",
    "EvalReport",
    "HeadScores",
    "HeadSet",
    "KnockoutCurve",
    "ModelSpec",
    "PromptPair",
    "UnsupportedArchitectureError",
    "ablate",
    "spec_for",
    "attach",
    "data",
    "evaluate",
    "evaluate_choices",
    "head_means",
    "kl_divergence",
    "knockout",
    "locate",
    "organism",
    "random_heads",
    "tune",
]
