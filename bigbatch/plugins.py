"""User code named in a config: `package.module:attribute` import paths for models and datasets."""

from __future__ import annotations

import importlib
from typing import Any


def resolve_import(spec: str) -> Any:
    """`package.module:attribute` → the attribute."""
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def plugin_problems(key: str, name: str, builtins: tuple[str, ...]) -> list[str]:
    """Why `name` is neither a built-in nor an importable `package.module:attribute`."""
    if name in builtins:
        return []
    if ":" not in name:
        return [f"{key}: unknown '{name}'; use one of {', '.join(builtins)} or an import path "
                "'package.module:attribute'"]
    try:
        resolve_import(name)
    except (ImportError, AttributeError) as err:
        return [f"{key}: cannot import '{name}' ({err}); check the module is on PYTHONPATH"]
    return []
