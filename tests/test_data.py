"""Calibration and evaluation data from the offline data directory (skips without ../shared/data)."""
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from sdsengine.config import CalibrationConfig
from sdsengine import data
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


def test_offline_ptb_joins_stripped_sentences_as_the_hub_does(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" no it was n't black monday \n but while the new york \n")
    ids, protocol = eval_tokens(CharTokenizer(), "ptb", str(tmp_path))
    assert bytes(ids[0].tolist()).decode() == "no it was n't black monday but while the new york"
    assert protocol.startswith("PTB test")


def sparsegpt_c4_sampler(docs, nsamples, seqlen, seed):
    """SparseGPT's get_c4 loop, written out: random document until one is longer than seqlen, random window."""
    rng, out = random.Random(seed), []
    for _ in range(nsamples):
        while True:
            ids = CharTokenizer()(docs[rng.randint(0, len(docs) - 1)]).input_ids
            if ids.shape[1] > seqlen:
                break
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[0, start:start + seqlen])
    return torch.stack(out)


class CountingTokenizer(CharTokenizer):
    def __init__(self):
        self.texts = []

    def __call__(self, text, return_tensors="pt"):
        self.texts.append(text)
        return super().__call__(text, return_tensors)


def test_hub_c4_windows_are_sparsegpts_draw_for_draw():
    docs = [f"short{i}" for i in range(5)] + ["x" * 40 + "abcdefghijklmnopqrstuvwxyz" * i for i in range(1, 6)]
    tokenizer = CountingTokenizer()
    windows = data._windows_from_documents(tokenizer, docs, CalibrationConfig("c4", nsamples=6, seqlen=48),
                                           random.Random(3))
    assert torch.equal(windows, sparsegpt_c4_sampler(docs, 6, 48, 3))
    assert len(tokenizer.texts) == len(set(tokenizer.texts)) < len(docs)  # drawn documents once each, others never
    with pytest.raises(ValueError, match="no C4 document is longer than seqlen=48"):
        data._windows_from_documents(tokenizer, ["short"] * 3, CalibrationConfig("c4", 2, 48), random.Random(0))


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


def test_a_long_calibration_text_is_tokenized_in_pieces_to_the_same_ids(tmp_path, monkeypatch):
    """Tokenized whole, a 60 MB file took 8.4 GB (the tokenizer's buffers); in pieces that end after a newline
    the ids are those of the whole (a short text is one piece, as before), a BOS only at the start."""
    from transformers import AutoTokenizer
    from tiny_models import save_tiny_tokenizer
    save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "a a\na b a\n\na a a a a a a a a a a a a a a a a\na"  # one line longer than a piece
    whole = data.token_stream(tokenizer, text)
    monkeypatch.setattr(data, "TOKENIZE_PIECE", 8)
    calls = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, t, **k: calls.append((t, k)) or real(self, t, **k))
    assert torch.equal(data.token_stream(tokenizer, text), whole)
    assert len(calls) > 3 and all(len(t) <= 8 for t, _ in calls)
    assert [k.get("add_special_tokens", True) for _, k in calls] == [True] + [False] * (len(calls) - 1)


def test_no_data_directory_and_no_datasets_is_named_before_the_model_loads(monkeypatch):
    """The CLI checks its data sources before loading the model (minutes for a large one): without a data
    directory the hub's reader, `datasets`, was only found missing once the windows were drawn."""
    from sdsengine.data import check_calibration_source, check_eval_source
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    monkeypatch.delenv("SDSENGINE_DATA_DIR", raising=False)
    for check in (lambda: check_calibration_source(CalibrationConfig(dataset="c4")),
                  lambda: check_eval_source("wikitext2")):
        with pytest.raises(RuntimeError, match=r"`datasets` is not installed: pass --data-dir"):
            check()


@needs_data
def test_the_run_report_names_the_data_directory_read_from_the_environment(monkeypatch):
    """A run reading the offline files through SDSENGINE_DATA_DIR recorded data_dir null, as if from the hub."""
    from transformers import AutoModelForCausalLM

    import sdsengine
    from sdsengine.config import WandaConfig
    from tiny_models import tiny_config
    config = tiny_config("llama")
    config.vocab_size = 256  # CharTokenizer's ids are bytes
    monkeypatch.setenv("SDSENGINE_DATA_DIR", str(DATA))
    result = sdsengine.prune(AutoModelForCausalLM.from_config(config), WandaConfig(sparsity="2:4"),
                             CalibrationConfig(nsamples=2, seqlen=16), tokenizer=CharTokenizer(), progress=False)
    assert result.report["calibration"]["data_dir"] == str(DATA.resolve())


def test_the_run_report_names_no_data_directory_for_a_calibration_file(monkeypatch, tmp_path):
    """A .txt calibration file is read from its own path: SDSENGINE_DATA_DIR, set for the evaluations, was recorded
    as the directory the calibration data came from."""
    from transformers import AutoModelForCausalLM

    import sdsengine
    from sdsengine.config import WandaConfig
    from tiny_models import tiny_config
    config = tiny_config("llama")
    config.vocab_size = 256  # CharTokenizer's ids are bytes
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("SDSENGINE_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    result = sdsengine.prune(AutoModelForCausalLM.from_config(config), WandaConfig(sparsity="2:4"),
                             CalibrationConfig(str(tmp_path / "calib.txt"), nsamples=2, seqlen=16),
                             tokenizer=CharTokenizer(), progress=False)
    assert result.report["calibration"]["data_dir"] is None
