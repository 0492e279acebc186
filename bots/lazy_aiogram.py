"""aiogram, imported with its Telegram models' pydantic schemas built when first used.

aiogram declares its ~460 types ``defer_build`` and then rebuilds every one of them at
import (the end of ``aiogram/types/__init__.py``), each schema inlining its whole tree of
nested types: ~100 MB of RSS and ~2.5 s of CPU in every process with a Telegram bot, which
uses a handful of them (``Message``, ``User``, ``Update``, the send methods). Imported here
(``bots.telegram`` does so before aiogram), those rebuilds only record the namespace aiogram
passes for its forward references; every model left incomplete (and ``Response``, whose
parametrisations inherit it) is given that namespace, and pydantic builds a model the first
time it is used, the same schema as before. When aiogram was imported already, or this
pydantic's ``model_rebuild`` does not take the private namespace argument this relies on
(a future release), aiogram is imported as usual: only the memory saving is lost.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

# The forward references aiogram resolves its types with (its ``_types_namespace``).
NAMESPACE: dict[str, Any] = {}


@contextlib.contextmanager
def _recorded_rebuilds(prefix: str) -> Iterator[None]:
    """While the block runs, ``model_rebuild`` calls that pass a namespace for a deferred
    model of a module under ``prefix`` record the namespace instead of building."""
    saved = BaseModel.__dict__["model_rebuild"]
    rebuild = saved.__func__

    def record(cls: type[BaseModel], *, force: bool = False, raise_errors: bool = True,
               _parent_namespace_depth: int = 2,
               _types_namespace: dict[str, Any] | None = None) -> bool | None:
        if (_types_namespace is not None and not force and not cls.__pydantic_complete__
                and cls.__module__.startswith(prefix)):
            NAMESPACE.update(_types_namespace)
            return None
        return rebuild(cls, force=force, raise_errors=raise_errors,
                       _parent_namespace_depth=_parent_namespace_depth + 1,
                       _types_namespace=_types_namespace)

    BaseModel.model_rebuild = classmethod(record)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        BaseModel.model_rebuild = saved  # type: ignore[method-assign]


def _give_namespace(prefix: str) -> int:
    """Every incomplete (or generic) model of a loaded module under ``prefix`` resolves its
    forward references, when pydantic builds it on first use, with ``NAMESPACE``."""
    given = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix):
            continue
        for value in list(vars(module).values()):
            if (isinstance(value, type) and issubclass(value, BaseModel)
                    and value.__module__ == name
                    and (not value.__pydantic_complete__
                         or value.__pydantic_generic_metadata__.get("parameters"))):
                value.__pydantic_parent_namespace__ = NAMESPACE
                given += 1
    return given


def _can_defer() -> bool:
    """Whether this pydantic's ``model_rebuild`` has the parameters ``record`` relies on."""
    parameters = inspect.signature(BaseModel.model_rebuild).parameters
    return {"_types_namespace", "_parent_namespace_depth"} <= parameters.keys() and hasattr(
        BaseModel, "__pydantic_parent_namespace__")


if "aiogram" not in sys.modules and _can_defer():
    with _recorded_rebuilds("aiogram."):
        import aiogram.methods
        import aiogram.types  # noqa: F401
    _give_namespace("aiogram.")


def resolve_like_aiogram(model: type[BaseModel]) -> None:
    """A model of ours derived from aiogram's (a method answered by a smaller type) is
    built, on first use, with the forward references aiogram's own models resolve with.
    When aiogram was imported as usual its models are complete and nothing is needed."""
    if NAMESPACE:
        model.__pydantic_parent_namespace__ = NAMESPACE
