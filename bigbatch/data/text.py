"""Language-model data: character-level text files, or a flat binary file of token ids.

Text comes from a file, the files under a folder that match a glob, or the members of an archive
(.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip) that match the glob, read in memory without unpacking.
Both are cut into non-overlapping windows of seq_len + 1 tokens; window i gives inputs
tokens[i·T : i·T+T] and targets shifted by one. The last `val_fraction` of the stream is held out.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from bigbatch.data.base import DataBundle, DataError

TOKEN_CHUNK = 1 << 22  # ids read per step of the vocabulary check: 8-16 MiB whatever the file size


class WindowSplit:
    """Non-overlapping next-token windows over a 1-D token array (in memory or memory-mapped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = indices.numpy().astype(np.int64)[:, None] * self.seq_len
        window = np.asarray(self.tokens[starts + np.arange(self.seq_len + 1)]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]


def _bundle(tokens: np.ndarray, seq_len: int, val_fraction: float, vocab: int, key: str) -> DataBundle:
    cut = int(len(tokens) * (1 - val_fraction))
    train, val = WindowSplit(tokens[:cut], seq_len), WindowSplit(tokens[cut:], seq_len)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{key}: {len(tokens)} tokens give no full window of data.seq_len={seq_len} "
                         f"in one split (val_fraction={val_fraction}); use more data or a shorter seq_len")
    return DataBundle(train, val, "lm", (seq_len,), vocab)


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)


def is_archive(path: str | Path) -> bool:
    """True for a file whose name ends like a tar or zip archive."""
    name = Path(path).name.lower()
    return Path(path).is_file() and name.endswith(TAR_SUFFIXES + ZIP_SUFFIXES)


def member_matches(name: str, pattern: str) -> bool:
    """Glob `pattern` against an archive member, from the right like Path.rglob: '*.txt' matches
    'pkg/texts/a.txt'; 'texts/*.txt' matches it too, 'other/*.txt' does not."""
    return PurePosixPath(name).match(pattern)


def decode_text(raw: bytes, where: str, errors: str = "strict") -> str:
    """UTF-8 text; invalid bytes raise DataError naming `where` and the byte offset (errors="strict")
    or become U+FFFD (errors="replace")."""
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise DataError(f"data.path: {where} is not valid UTF-8 at byte offset {err.start} ({err.reason}); "
                        "fix the file, or set data.errors: replace to read it with U+FFFD") from None


def archive_texts(path: str | Path, pattern: str, errors: str = "strict") -> dict[str, str]:
    """The regular-file members of an archive matching `pattern`, name -> UTF-8 text, sorted by name."""
    path = Path(path)
    try:
        if path.name.lower().endswith(ZIP_SUFFIXES):
            with zipfile.ZipFile(path) as archive:
                names = [i.filename for i in archive.infolist() if not i.is_dir()]
                chosen = sorted(n for n in names if member_matches(n, pattern))
                raw = {n: archive.read(n) for n in chosen}
        else:
            # One pass in stored order: a compressed stream cannot seek back without decompressing
            # again from the start. The compression is detected from the content.
            with tarfile.open(path, "r|*") as archive:
                raw = {m.name: archive.extractfile(m).read() for m in archive
                       if m.isfile() and member_matches(m.name, pattern)}
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(f"data.path: cannot read the archive {path}: {err}; "
                         "point it at a valid .tar[.gz|.bz2|.xz], .tgz or .zip") from err
    return {n: decode_text(raw[n], f"{path}:{n}", errors) for n in sorted(raw)}


def text_files(path: str | Path, pattern: str) -> list[Path]:
    """A plain file itself, or the files under a folder matching `pattern` (sorted)."""
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())


def read_texts(path: str | Path, pattern: str, errors: str = "strict") -> list[str]:
    """The texts `data.path` and `data.glob` select: archive members, a file, or a folder's files."""
    if is_archive(path):
        return list(archive_texts(path, pattern, errors).values())
    return [decode_text(f.read_bytes(), str(f), errors) for f in text_files(path, pattern)]


def load_text(path: str | Path, pattern: str, seq_len: int, val_fraction: float,
              errors: str = "strict") -> DataBundle:
    """Character-level corpus: the vocabulary is the sorted set of characters in all texts."""
    texts = read_texts(path, pattern, errors)
    if not texts:
        where = "in the archive" if is_archive(path) else "under"
        raise ValueError(f"data.path: no files matching data.glob={pattern!r} {where} {path}")
    tokens, vocab_size = char_ids("\n".join(texts))
    return _bundle(tokens, seq_len, val_fraction, vocab_size, "data.path")


def char_ids(text: str) -> tuple[np.ndarray, int]:
    """Each character's rank in the sorted set of distinct characters, and that set's size.
    Vectorised over code points (UTF-32), so a corpus of millions of characters takes milliseconds."""
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    present = np.zeros(int(codes.max(initial=0)) + 1, dtype=bool)
    present[codes] = True
    rank = np.cumsum(present, dtype=np.int64) - 1  # code point -> index in sorted(set(text))
    return rank[codes], int(present.sum())


def load_tokens(path: str | Path, dtype: str, seq_len: int, val_fraction: float,
                vocab_size: int | None) -> DataBundle:
    """A nanoGPT-style flat binary of uint16/uint32 ids, read lazily through np.memmap."""
    size, width = Path(path).stat().st_size, np.dtype(dtype).itemsize
    if size == 0 or size % width:
        raise DataError(f"data.path: {path} holds {size} bytes, not a whole number of {dtype} ids; "
                        "check data.token_dtype and the file")
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    return _bundle(tokens, seq_len, val_fraction, token_vocab(tokens, vocab_size, path), "data.path")


def token_vocab(tokens: np.ndarray, vocab_size: int | None, path: str | Path) -> int:
    """`vocab_size` once every id is checked to lie below it, or max id + 1 when unset. Read in chunks,
    so a memory-mapped file is never loaded whole; an id outside the vocabulary would otherwise be an
    IndexError in the embedding mid-training."""
    top = 0
    for start in range(0, len(tokens), TOKEN_CHUNK):
        chunk = np.asarray(tokens[start:start + TOKEN_CHUNK])
        top = max(top, int(chunk.max()))
        if vocab_size is not None and top >= vocab_size:
            first = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(f"data.path: {path}: token id {int(chunk[first - start])} at index {first} (byte "
                            f"offset {first * tokens.itemsize}) is not below data.vocab_size={vocab_size}; "
                            "raise data.vocab_size or fix the file")
    return vocab_size or top + 1
