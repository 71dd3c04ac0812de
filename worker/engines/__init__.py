"""Engine registry: a name maps to a factory. Nothing outside this package names an engine class."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from worker.engines.base import Engine

# name -> "module:factory"; the factory takes the engine's options as keyword arguments.
ENGINES: dict[str, str] = {
    "piper": "worker.engines.piper:create_engine",
    "cosyvoice": "worker.engines.cosyvoice:create_engine",
}


def factory(name: str) -> Callable[..., Engine]:
    """The named engine's factory (imports its module); ValueError for an unknown name."""
    try:
        target = ENGINES[name]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise ValueError(f"Unknown engine {name!r}; known engines: {known}") from None
    module_name, factory_name = target.split(":")
    found: Callable[..., Engine] = getattr(importlib.import_module(module_name), factory_name)
    return found


def declares_option(name: str, option: str) -> bool:
    """Whether the engine's factory names `option` as a parameter (not just `**options`)."""
    return option in inspect.signature(factory(name)).parameters


def create_engine(name: str, **options: Any) -> Engine:
    """Build the named engine; its module is imported only when chosen, keeping deps optional.

    An option the factory does not name (when it takes no `**options`) is a ValueError that
    names it and the engine's options, never a silently ignored setting.
    """
    build = factory(name)
    parameters = inspect.signature(build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(options) - set(parameters))
    if unknown and not takes_any:
        known = ", ".join(sorted(parameters))
        raise ValueError(
            f"Engine {name!r} has no option {', '.join(unknown)}; its options are: {known}"
        )
    return build(**options)
