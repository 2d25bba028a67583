"""Model registry: every module in this package registers its classes; adding a model is one file."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import BadInputError
from .base import DEPTH, SALIENCY, MapModel

_REGISTRY: dict[str, type[MapModel]] = {}
_DEFAULTS = {SALIENCY: "isnet-general-use", DEPTH: "depth-anything-v2-small"}


def register(cls: type[MapModel]) -> type[MapModel]:
    """Class decorator: make a model available under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "weights"):
            importlib.import_module(f"{__name__}.{info.name}")


def model_names(task: str | None = None) -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if task is None or c.task == task)


def model_class(name: str) -> type[MapModel]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadInputError(f"unknown model {name!r}; available: {', '.join(model_names())}") from None


def default_model(task: str) -> str:
    return _DEFAULTS[task]


def create_model(name: str, task: str | None = None, **kwargs) -> MapModel:
    cls = model_class(name)
    if task is not None and cls.task != task:
        raise BadInputError(f"model {name!r} is a {cls.task} model, not a {task} model")
    return cls(**kwargs)


def load_model(task: str, name: str | None = None, weights: str | None = None, device: str | None = None,
               batch_size: int = 4, fallback: bool = True) -> MapModel:
    return create_model(name or default_model(task), task, weights=weights, device=device, batch_size=batch_size)


_discover()

__all__ = ["DEPTH", "SALIENCY", "MapModel", "create_model", "default_model", "model_class",
           "load_model", "model_names", "register"]
