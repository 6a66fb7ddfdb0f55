"""Torch-free checks of the `data` section, run by bigbatch.validate before anything starts."""

from __future__ import annotations

from pathlib import Path

from bigbatch.config import DataConfig
from bigbatch.plugins import plugin_problems

BUILTIN_DATA = ("fashion_mnist", "text", "tokens", "synthetic")
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def data_problems(data: DataConfig) -> list[str]:
    if data.name not in BUILTIN_DATA:
        return plugin_problems("data.name", data.name, BUILTIN_DATA)
    if data.name == "fashion_mnist":
        folder = Path(data.path or DEFAULT_FASHION_MNIST)
        if not (folder / "train-images-idx3-ubyte.gz").is_file():
            return [f"data.path: no Fashion-MNIST IDX files in {folder}; install them with "
                    "`apt-get install dataset-fashion-mnist` (Debian) or set data.path to a folder "
                    "holding train-images-idx3-ubyte.gz and friends"]
    if data.name in ("text", "tokens"):
        if data.path is None:
            return [f"data.path: required for data.name={data.name}"]
        if data.name == "tokens" and not Path(data.path).is_file():
            return [f"data.path: token file {data.path} not found"]
        if data.name == "text" and not Path(data.path).exists():
            return [f"data.path: {data.path} not found; point it at a text file or a folder"]
    return []
