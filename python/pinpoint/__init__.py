"""pinpoint: locate and fine-tune the attention heads behind one behaviour of a causal LM.

``import pinpoint`` is light: the public names below are imported from their modules on
first use (PEP 562 module ``__getattr__``), so training code (``pinpoint.tune``,
``pinpoint.organism.train``), the peer libraries and matplotlib load only when used.
``pp.organism``, ``pp.data``, ``pp.recipe`` and ``pp.testing`` are modules, loaded the same way.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "AdapterMismatchError": "adapter", "PinpointAdapter": "adapter", "attach": "adapter", "random_heads": "adapter",
    "EvalReport": "evaluate", "evaluate": "evaluate",
    "evaluate_choices": "general", "kl_divergence": "general",
    "HeadScores": "heads", "HeadSet": "heads",
    "KnockoutCurve": "locate", "knockout": "locate", "locate": "locate",
    # ModelAdapter and adapter_for: deprecated aliases of ModelSpec and spec_for
    "ModelAdapter": "models", "ModelSpec": "models", "UnsupportedArchitectureError": "models",
    "adapter_for": "models", "spec_for": "models",
    "ablate": "patching", "head_means": "patching",
    "PromptPair": "prompts",
    "FullTuning": "tune", "tune": "tune", "TuneConfig": "tune_config", "Trainer": "trainer",
    "UserError": "errors", "InputError": "errors",
}
_SUBMODULES = ("data", "organism", "recipe", "testing")

__all__ = ["__version__", *sorted(_LAZY), *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})


class _Package(types.ModuleType):
    """``pp.locate``, ``pp.tune`` and ``pp.evaluate`` are functions, but their names are also
    submodules, and importing a submodule binds its name on the package. These properties keep
    the function: a binding of the submodule itself is ignored, anything else (a user's
    monkeypatch) is kept."""


def _function_property(name: str) -> property:
    module_name = f"{__name__}.{name}"

    def get(self):
        value = self.__dict__.get(name)
        if value is None or isinstance(value, types.ModuleType):
            value = getattr(importlib.import_module(module_name), name)
            self.__dict__[name] = value
        return value

    def set_(self, value):
        if not (isinstance(value, types.ModuleType) and value.__name__ == module_name):
            self.__dict__[name] = value

    def delete(self):
        self.__dict__.pop(name, None)

    return property(get, set_, delete, f"pinpoint.{name}.{name} (see its docstring)")


for _name in ("locate", "tune", "evaluate"):
    setattr(_Package, _name, _function_property(_name))
del _name
sys.modules[__name__].__class__ = _Package
