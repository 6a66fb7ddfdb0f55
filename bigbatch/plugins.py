"""User code named in a config: `package.module:attribute` import paths for models and datasets.

A config that names user code runs it, as a Python config would. Two lines of defence keep a typo or a
hostile config from running something else: validation (and `--print-config`) never imports user
code, it only checks the syntax and that the top-level package can be found; the import happens when
the run builds, refuses the standard library and builtins (`os:system`), and the registries check
what the attribute is before calling it.

Packages are found as `python -m` finds them: the current directory comes first on sys.path once a
config names user code, so `bigbatch train` (the console script, whose sys.path starts with its own
folder) sees `my_pkg/` beside you just as `python -m bigbatch train` does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from bigbatch.registry import import_attribute


class PluginError(ValueError):
    """A `package.module:attribute` that cannot be used; the message names the config key."""


def _is_standard(module_name: str) -> bool:
    top = module_name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _split(key: str, spec: str) -> tuple[str, str]:
    """(module, attribute path), or PluginError when `spec` is not `package.module:attribute`."""
    module_name, _, attr = spec.partition(":")
    names = module_name.split(".") + attr.split(".")
    if spec.count(":") != 1 or not all(n.isidentifier() for n in names):
        raise PluginError(f"{key}: '{spec}' is not an import path 'package.module:attribute'")
    if _is_standard(module_name):
        raise PluginError(f"{key}: '{spec}' is in Python's standard library; name a class or function "
                          "of your own package")
    return module_name, attr


def cwd_on_path() -> None:
    """Put the current directory first on sys.path, as `python -m` does, unless it is there already."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


def plugin_problems(key: str, name: str, builtins: tuple[str, ...]) -> list[str]:
    """Why `name` is neither a built-in nor a findable `package.module:attribute`. Imports nothing:
    `find_spec` on the top-level package only locates it, without executing any of its code."""
    if name in builtins:
        return []
    if ":" not in name:
        return [f"{key}: unknown '{name}'; use one of {', '.join(builtins)} or an import path "
                "'package.module:attribute'"]
    try:
        module_name, _ = _split(key, name)
    except PluginError as err:
        return [str(err)]
    top = module_name.partition(".")[0]
    cwd_on_path()
    if importlib.util.find_spec(top) is None:
        return [f"{key}: cannot import '{name}' (no package '{top}'); check the module is on PYTHONPATH"]
    return []


def load_plugin(key: str, spec: str) -> Any:
    """Import `package.module:attribute` (running that module's code) and return the attribute, which
    must be defined outside the standard library. The caller checks its kind before calling it."""
    _split(key, spec)  # refuses a malformed path or the standard library before importing anything
    cwd_on_path()
    try:
        obj = import_attribute(spec)
    except (ImportError, AttributeError) as err:
        raise PluginError(f"{key}: cannot import '{spec}' ({err}); check the module is on PYTHONPATH") from None
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str) or _is_standard(home):
        raise PluginError(f"{key}: '{spec}' is defined in {home or 'an unknown module'}, not in your own "
                          "code; name a class or function of your package")
    return obj
