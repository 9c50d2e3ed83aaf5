"""Calibration and evaluation data from the offline data directory (skips without ../shared/data)."""
import os
from pathlib import Path

import pytest
import torch

from sdsengine.config import CalibrationConfig
from sdsengine.data import calibration_samples, eval_tokens, wikitext_rows

DATA = Path(os.environ.get("SDSENGINE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "wikitext2").is_dir(), reason=f"no offline data directory at {DATA}")


class CharTokenizer:
    """One token per byte: enough to check windows and protocols without a real tokenizer."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([list(text.encode("utf-8"))])
        return type("Enc", (), {"input_ids": ids})()


@needs_data
def test_wikitext_rows_rebuild_hf_rows():
    rows = wikitext_rows(DATA / "wikitext2" / "wiki.test.orig.raw")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(1 for r in rows if r) == 2891


@needs_data
def test_c4_calibration_is_seeded_and_shaped():
    cfg = CalibrationConfig("c4", nsamples=4, seqlen=64, seed=0, data_dir=str(DATA))
    a, b = calibration_samples(CharTokenizer(), cfg), calibration_samples(CharTokenizer(), cfg)
    assert a.shape == (4, 64) and torch.equal(a, b)
    c = calibration_samples(CharTokenizer(), CalibrationConfig("c4", 4, 64, seed=1, data_dir=str(DATA)))
    assert not torch.equal(a, c)


@needs_data
def test_too_many_samples_named():
    cfg = CalibrationConfig("wikitext2", nsamples=10 ** 6, seqlen=2048, data_dir=str(DATA))
    with pytest.raises(ValueError, match="fewer than nsamples=1000000"):
        calibration_samples(CharTokenizer(), cfg)


@needs_data
def test_c4_proxy_is_labelled():
    _, protocol = eval_tokens(CharTokenizer(), "c4", str(DATA))
    assert "PROXY" in protocol


def test_missing_file_in_data_dir_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext2/wiki.test.orig.raw"):
        eval_tokens(CharTokenizer(), "wikitext2", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ptb/ptb.test.txt"):
        eval_tokens(CharTokenizer(), "ptb", str(tmp_path))


def test_missing_data_dir_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_tokens(CharTokenizer(), "wikitext2", str(tmp_path / "nope"))


def test_calibration_from_text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("abcdefgh" * 100)
    cfg = CalibrationConfig(str(path), nsamples=3, seqlen=16)
    assert calibration_samples(CharTokenizer(), cfg).shape == (3, 16)
    with pytest.raises(ValueError, match="unknown calibration dataset"):
        calibration_samples(CharTokenizer(), CalibrationConfig("imagenet", 1, 16, data_dir=str(tmp_path)))
