"""Model registry: every module in this package registers its classes; adding a model is one file."""

from __future__ import annotations

import importlib
import logging
import pkgutil

from ..errors import BadInputError, WeightsUnavailableError
from .base import DEPTH, SALIENCY, MapModel

_REGISTRY: dict[str, type[MapModel]] = {}
_DEFAULTS = {SALIENCY: "isnet-general-use", DEPTH: "depth-anything-v2-small"}


def register(cls: type[MapModel]) -> type[MapModel]:
    """Class decorator: make a model available under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "weights", "hf_depth"):  # helpers that register nothing
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


FALLBACK_DEPTH = "ground-prior"
_warned_fallback: set[str] = set()


def load_model(task: str, name: str | None = None, weights: str | None = None, device: str | None = None,
               batch_size: int = 4, fallback: bool = True) -> MapModel:
    """The model for ``task`` (``name``, else the task's default), loaded once, ready to predict.

    ``weights``: a path or URI overriding where the weights come from. When a depth model's
    weights cannot be had and ``fallback`` is true, a warning is logged (once per model name and
    process) and the weight-free ground prior is returned instead; ``model.name`` and
    ``model.version`` always say which model actually runs. Saliency models never fall back.
    """
    name = name or default_model(task)
    try:
        return create_model(name, task, weights=weights, device=device, batch_size=batch_size)
    except WeightsUnavailableError as exc:
        if not fallback or task != DEPTH or name == FALLBACK_DEPTH:
            raise
        if name not in _warned_fallback:
            _warned_fallback.add(name)
            reason = str(exc) if name in str(exc) else f"no weights for {name} ({exc})"
            logging.getLogger(__name__).warning("%s; using %s depth instead", reason, FALLBACK_DEPTH)
        return create_model(FALLBACK_DEPTH, DEPTH, device=device, batch_size=batch_size)


_discover()

__all__ = ["DEPTH", "SALIENCY", "MapModel", "create_model", "default_model", "model_class",
           "load_model", "model_names", "register"]
