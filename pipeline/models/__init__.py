"""Model registry: which models there are, and in which module each one lives.

A model's module is imported only when the model is used or its class is asked for, so importing
this package (as every CLI command does) loads no model code. Adding a model is its module plus
one line in ``_MODULES``.
"""

from __future__ import annotations

import importlib
import logging

from ..errors import BadInputError, WeightsUnavailableError
from .base import DEPTH, SALIENCY, MapModel

# name -> module in this package that defines and registers it
_MODULES: dict[str, str] = {
    "isnet-general-use": "isnet",
    "u2net": "u2net",
    "u2netp": "u2net",
    "trivial-saliency": "trivial",
    "depth-anything-v2-small": "depth_anything",
    "dpt-large": "dpt",
    "ground-prior": "ground_prior",
    "trivial-depth": "trivial",
}
_CLASSES: dict[str, type[MapModel]] = {}
DEFAULTS = {SALIENCY: "isnet-general-use", DEPTH: "depth-anything-v2-small"}
TASKS = tuple(DEFAULTS)


def register(cls: type[MapModel]) -> type[MapModel]:
    """Class decorator: make a model available under its ``name``."""
    _CLASSES[cls.name] = cls
    return cls


def model_names(task: str | None = None) -> list[str]:
    """Every model's name; with ``task``, those of that task (which imports their modules)."""
    names = sorted(set(_MODULES) | set(_CLASSES))
    return names if task is None else [n for n in names if model_class(n).task == task]


def model_class(name: str) -> type[MapModel]:
    if name not in _CLASSES and name in _MODULES:
        importlib.import_module(f"{__name__}.{_MODULES[name]}")
    if name not in _CLASSES and name.startswith("hf:"):  # any transformers depth model, by hub id
        from .hub_depth import hub_depth_class

        register(hub_depth_class(name))
    try:
        return _CLASSES[name]
    except KeyError:
        raise BadInputError(
            f"unknown model {name!r}; available: {', '.join(model_names())}, or hf:ORG/NAME for a depth model "
            "of the model hub"
        ) from None


def default_model(task: str) -> str:
    return DEFAULTS[task]


def default_models() -> list[str]:
    """The default model of every task: what a plain `dreamfocus models fetch` fetches."""
    return [DEFAULTS[task] for task in TASKS]


def create_model(name: str, task: str | None = None, runtime: str | None = None, **kwargs) -> MapModel:
    """Model ``name`` built with ``kwargs``; ``runtime`` (None or "auto": the model's own choice)
    is checked first: one the model has not, or whose package is not installed, is a BadInputError."""
    cls = model_class(name)
    if task is not None and cls.task != task:
        raise BadInputError(f"model {name!r} is a {cls.task} model, not a {task} model")
    chosen = cls.runtime_for(kwargs.get("device"), runtime)  # the default device only where it matters
    if chosen is not None:
        kwargs["runtime"] = chosen
    return cls(**kwargs)


FALLBACK_DEPTH = "ground-prior"
_warned_fallback: set[str] = set()


def load_model(
    task: str,
    name: str | None = None,
    weights: str | None = None,
    device: str | None = None,
    batch_size: int = 4,
    fallback: bool = True,
    runtime: str | None = None,
) -> MapModel:
    """The model for ``task`` (``name``, else the task's default), loaded once, ready to predict.

    ``weights``: a path or URI overriding where the weights come from. ``device``: "cpu",
    "cuda", "cuda:1", ... (default: the first GPU when torch sees one, else the CPU). When a
    depth model's weights cannot be had (none named: weights named that cannot be used are an
    error, as in a job) and ``fallback`` is true, a warning is logged (once per model name and
    process) and the weight-free ground prior is returned instead;
    ``model.describe()`` always says which model, weights, runtime and device actually run.
    Saliency models never fall back. ``runtime``: see ``create_model``.
    """
    name = name or default_model(task)
    try:
        return create_model(name, task, runtime, weights=weights, device=device, batch_size=batch_size)
    except WeightsUnavailableError as exc:
        if not fallback:
            raise
        instead = depth_fallback(task, name, exc, named=weights is not None, warn=name not in _warned_fallback)
        _warned_fallback.add(name)
        return create_model(instead, DEPTH, device=device, batch_size=batch_size)


def depth_fallback(task: str, name: str, exc: WeightsUnavailableError, named: bool = False, warn: bool = True) -> str:
    """The model that runs instead of ``name``, whose weights cannot be had (``exc`` says why):
    the ground prior for a depth model, with one warning (where ``warn``). The one decision of it,
    for a model that loads and for a job's driver. ``exc`` is raised again for a saliency model,
    for the ground prior itself, and where the weights were ``named`` explicitly and cannot be
    used (they are not silently replaced by another model)."""
    if named or task != DEPTH or name == FALLBACK_DEPTH:
        raise exc
    if warn:
        log = logging.getLogger(__name__)
        log.info("%s", exc)  # the how-to is in `dreamfocus models list`, and here in full with -v
        why = str(exc).split(";")[0]
        why = why if name in why else f"no weights for {name} ({why})"
        log.warning(
            "%s: using %s depth instead (`dreamfocus models list` says how to supply the weights)",
            why,
            FALLBACK_DEPTH,
        )
    return FALLBACK_DEPTH


__all__ = [
    "DEFAULTS",
    "DEPTH",
    "SALIENCY",
    "TASKS",
    "MapModel",
    "create_model",
    "default_model",
    "default_models",
    "depth_fallback",
    "load_model",
    "model_class",
    "model_names",
    "register",
]
