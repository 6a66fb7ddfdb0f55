"""Write a text corpus as a nanoGPT-style token file: a flat array of little-endian uint16 ids, no header.

    python scripts/text_to_tokens.py CORPUS OUT.bin [--glob '*.txt']

CORPUS is what `data.name: text` reads (a file, a folder's files matching --glob, or the matching
members of a .tar[.gz|.bz2|.xz]/.zip), joined with newlines in the same order. The ids are the text's
UTF-8 bytes (vocabulary 256): no tokenizer to fetch or train, and every file round-trips exactly
(`bytes(np.fromfile(OUT, np.uint16).astype(np.uint8)).decode()` is the corpus). The output is what
`data.name: tokens` (`token_dtype: uint16`) memory-maps, as it does a train.bin written by nanoGPT's
prepare.py with GPT-2's tokenizer (then `data.vocab_size: 50304`).

A script rather than a `bigbatch` subcommand: preparing data happens once, before any job and off the
cluster, like nanoGPT's prepare.py; the CLI stays the job runner. It reuses bigbatch's own text
reader, so it takes every corpus the `text` dataset takes, with the same UTF-8 check.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: bigbatch importable
from bigbatch.data.base import DataError  # noqa: E402
from bigbatch.data.text import read_texts  # noqa: E402


def byte_tokens(texts: list[str]) -> np.ndarray:
    """The texts joined by newlines (as the text dataset joins them), as uint16 UTF-8 byte ids."""
    raw = "\n".join(texts).encode("utf-8")
    return np.frombuffer(raw, dtype=np.uint8).astype("<u2")


def write_tokens(corpus: str | Path, out: str | Path, pattern: str = "*.txt") -> int:
    """Write `out` (through a temporary sibling, renamed once complete); returns the number of ids."""
    texts = read_texts(corpus, pattern)
    if not texts:
        raise DataError(f"{corpus}: no text matching --glob {pattern!r}")
    ids = byte_tokens(texts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    ids.tofile(tmp)
    os.replace(tmp, out)  # a reader never sees half a file
    return len(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", help="a text file, a folder, or a .tar[.gz]/.zip archive")
    parser.add_argument("out", help="the token file to write (e.g. data/shakespeare.bin)")
    parser.add_argument("--glob", default="*.txt", help="files or archive members to read (default *.txt)")
    args = parser.parse_args(argv)
    if not Path(args.corpus).exists():
        print(f"text_to_tokens: {args.corpus} does not exist; pass a text file, folder or archive", file=sys.stderr)
        return 2
    try:
        count = write_tokens(args.corpus, args.out, args.glob)
    except (DataError, ValueError) as err:
        print(f"text_to_tokens: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {count} uint16 ids (UTF-8 bytes, vocabulary 256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
