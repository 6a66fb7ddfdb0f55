"""Issue 13, item 9: a bad dataset stops the run at load with exit 2 and one line naming the file.

Token ids outside the vocabulary used to be an IndexError mid-training, invalid UTF-8 was silently
replaced, a corrupt gzip was a BadGzipFile traceback.
"""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

from bigbatch.cli import main
from bigbatch.config import DataConfig
from bigbatch.data import text
from bigbatch.data.base import DataError
from bigbatch.data.registry import build_data
from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch
from tests.unit.test_data import write_idx

GPT = {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}


def token_file(tmp_path, bad_at: int | None, n: int = 5000, vocab: int = 50):
    ids = np.arange(n, dtype=np.uint16) % vocab
    if bad_at is not None:
        ids[bad_at] = vocab + 27
    ids.tofile(tmp_path / "tokens.bin")
    return tmp_path / "tokens.bin"


def tokens_config(tmp_path, path, **data):
    raw = tiny_config(tmp_path, data={"name": "tokens", "path": str(path), "seq_len": 16, "vocab_size": 50,
                                      **data}, model=GPT, optim={"name": "adamw", "lr": 1e-3})
    return write_config(tmp_path / "c.yaml", raw)


def test_token_ids_outside_the_vocabulary_stop_the_rank_with_one_line(tmp_path):
    config = tokens_config(tmp_path, token_file(tmp_path, bad_at=3000))
    result = bigbatch("train", str(config), timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"bigbatch: error: data.path: {tmp_path / 'tokens.bin'}: token id 77 at index 3000 (byte offset 6000) "
        "is not below data.vocab_size=50; raise data.vocab_size or fix the file"]
    assert not (tmp_path / "runs").exists()


def test_under_launch_each_rank_reports_the_data_error_in_one_line_without_a_traceback(tmp_path):
    config = tokens_config(tmp_path, token_file(tmp_path, bad_at=3000))
    result = bigbatch("launch", "--nproc-per-node", "2", str(config), timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in (result.stderr + result.stdout).splitlines() if "token id 77 at index 3000" in ln]
    assert 1 <= len(lines) <= 2 and all(ln.startswith("bigbatch: error: data.path: ") for ln in lines)


def test_the_vocabulary_check_reads_the_memmap_in_chunks(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(text, "TOKEN_CHUNK", 1024)
    real_asarray = np.asarray
    monkeypatch.setattr(text.np, "asarray", lambda a, *k, **kw: reads.append(len(a)) or real_asarray(a, *k, **kw))
    with pytest.raises(DataError, match=r"token id 77 at index 4500 \(byte offset 9000\)"):
        text.load_tokens(token_file(tmp_path, bad_at=4500), "uint16", 16, 0.1, vocab_size=50)
    assert reads == [1024] * 4 + [5000 - 4096]  # never more than one chunk in memory
    clean = text.load_tokens(token_file(tmp_path, bad_at=None), "uint16", 16, 0.1, vocab_size=None)
    assert clean.num_classes == 50  # max id + 1, found chunk by chunk too


def test_a_token_file_that_is_not_whole_ids_is_named(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=f"data.path: {path} holds 3 bytes, not a whole number of uint16 ids"):
        text.load_tokens(path, "uint16", 4, 0.1, vocab_size=None)


def text_config(tmp_path, **data):
    raw = tiny_config(tmp_path, data={"name": "text", "path": str(tmp_path / "corpus"), "seq_len": 8,
                                      **data}, model=GPT, optim={"name": "adamw", "lr": 1e-3})
    return write_config(tmp_path / "c.yaml", raw)


def write_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("all good here. " * 40)
    (tmp_path / "corpus" / "b.txt").write_bytes(b"caf\xc3\xa9 ok, then " + b"\xff\xfe" + b" more text" * 40)
    return tmp_path / "corpus" / "b.txt"


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path, capsys):
    bad = write_corpus(tmp_path)
    assert main(["train", str(text_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"bigbatch: error: data.path: {bad} is not valid UTF-8 at byte offset 15 (invalid start byte); "
        "fix the file, or set data.errors: replace to read it with U+FFFD"]
    assert not (tmp_path / "runs").exists()


def test_data_errors_replace_reads_invalid_bytes_as_replacement_characters(tmp_path):
    write_corpus(tmp_path)
    data = build_data(DataConfig(name="text", path=str(tmp_path / "corpus"), seq_len=8, errors="replace"), 0)
    strict_chars = set("all good here. " + "café ok, then  more text\n")
    assert data.num_classes == len(strict_chars | {"\ufffd"})


def test_invalid_utf8_in_an_archive_member_names_archive_and_member(tmp_path):
    archive = tmp_path / "corpus.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"ok\n\x80bad"
        info = tarfile.TarInfo("texts/x.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=f"data.path: {archive}:texts/x.txt is not valid UTF-8 at byte offset 3"):
        text.load_text(archive, "*.txt", 2, 0.2)


def fashion_folder(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    for prefix, n in (("train", 6), ("t10k", 2)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.zeros(n, np.uint8))
    return folder


def fashion_config(tmp_path, folder):
    raw = tiny_config(tmp_path, data={"name": "fashion_mnist", "path": str(folder)},
                      batch={"global_batch": 2})
    return write_config(tmp_path / "c.yaml", raw)


@pytest.mark.parametrize("damage, says", [
    (lambda raw: b"not a gzip stream at all", "is not a readable gzip file (Not a gzipped file"),
    (lambda raw: raw[: len(raw) // 2], "is not a readable gzip file (Compressed file ended"),
    (lambda raw: gzip.compress(gzip.decompress(raw)[:-100]), "is truncated or padded (4604 data bytes, 4704 "
                                                               "expected for dimensions [6, 28, 28])"),
])
def test_a_bad_fashion_mnist_file_names_the_file(tmp_path, capsys, damage, says):
    folder = fashion_folder(tmp_path)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(damage(images.read_bytes()))
    assert main(["train", str(fashion_config(tmp_path, folder))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bigbatch: error: data.path: {images} {says}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_an_intact_fashion_mnist_folder_still_loads(tmp_path):
    data = build_data(DataConfig(name="fashion_mnist", path=str(fashion_folder(tmp_path))), 0)
    assert (len(data.train), len(data.val)) == (6, 2)
