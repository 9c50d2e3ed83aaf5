"""Saving never clobbers, and a failed save leaves nothing half-written."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine.checkpoint import REPORT_NAME, check_output_dir, save_checkpoint
from tiny_models import tiny_model, tiny_tokens


def test_round_trip_keeps_exact_zeros(tmp_path):
    model = tiny_model("llama")
    result = sdsengine.prune(model, sdsengine.WandaConfig(sparsity="2:4"), tiny_tokens(), progress=False)
    out = save_checkpoint(model, None, tmp_path / "pruned", result.report)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    w = loaded.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, model.model.layers[0].mlp.up_proj.weight) and (w == 0).float().mean() == 0.5
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["recipe"]["method"] == "wanda" and report["recipe"]["sparsity"] == "2:4"
    assert len(report["layers"]) == 2 and "versions" in report and "memory" in report


def test_non_empty_dir_is_refused_and_kept(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_dir(tmp_path)
    with pytest.raises(FileExistsError):
        save_checkpoint(tiny_model("llama"), None, tmp_path, {})
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_failed_save_leaves_no_directory(tmp_path):
    class Broken(torch.nn.Module):
        def save_pretrained(self, path, **kwargs):
            (path / "partial.bin").write_text("x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(Broken(), None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    save_checkpoint(tiny_model("gpt2"), None, out, {"x": 1}, overwrite=True)
    assert not (out / "old.txt").exists() and (out / REPORT_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
