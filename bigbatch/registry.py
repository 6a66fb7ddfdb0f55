"""Named components (optimizers, compressors, strategies): one torch-free registry type for all.

A registration says what the rest of bigbatch needs to know about a component before it exists (its
state bytes, comm kinds, whether it shards) and where its builder lives as a `module:function` path,
imported only when a run builds it. Config validation reads registries, so it never imports torch.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Generic, Iterator, TypeVar

Spec = TypeVar("Spec")


def import_attribute(path: str) -> Any:
    """`package.module:attr.sub` → that attribute (importing the module, which may import torch)."""
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[Spec]):
    """Specs by name; an unknown name is a ValueError naming the config key and the choices."""

    def __init__(self, key: str, noun: str):
        self.key, self.noun = key, noun
        self._specs: dict[str, Spec] = {}

    def register(self, name: str, spec: Spec) -> None:
        if name in self._specs:
            raise ValueError(f"{self.noun} {name!r} is already registered")
        self._specs[name] = spec

    def get(self, name: str, key: str | None = None, names: list[str] | None = None) -> Spec:
        """The spec of `name` among `names` (default: all); ValueError naming `key` and the closest."""
        names = list(self._specs) if names is None else names
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{key or self.key}: unknown {self.noun} '{name}'.{hint} "
                             f"Choose one of {', '.join(names)}")
        return self._specs[name]

    def find(self, name: str) -> Spec | None:
        return self._specs.get(name)

    def items(self):
        return self._specs.items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs
