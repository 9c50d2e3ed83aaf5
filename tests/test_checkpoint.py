"""Saving never clobbers, and a failed save leaves nothing half-written."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine.checkpoint import REPORT_NAME, check_output_dir, save_checkpoint
from tiny_models import tiny_model, tiny_tokens


def test_round_trip_keeps_exact_zeros(tmp_path):
    model = tiny_model("llama")
    result = sdsengine.prune(model, sdsengine.WandaConfig(sparsity="2:4"), tiny_tokens(), progress=False)
    out = sdsengine.save_checkpoint(model, None, tmp_path / "pruned", result.report)  # as `sdsengine prune` saves
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


def test_overwrite_replaces_an_earlier_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "old.txt").write_text("old")
    save_checkpoint(tiny_model("gpt2"), None, out, {"x": 1}, overwrite=True)
    assert not (out / "old.txt").exists() and (out / REPORT_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_deletes_a_folder_that_holds_no_checkpoint(tmp_path, monkeypatch):
    """--overwrite replaces the output whole: a folder of the user's own files (no config.json or
    sdsengine.json), the current directory or one holding it, is refused, and nothing in it is touched."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no model checkpoint .* for --overwrite to replace"):
        save_checkpoint(tiny_model("gpt2"), None, project, {}, overwrite=True)
    (project / "config.json").write_text("{}")  # even a checkpoint, when it is where the user stands
    monkeypatch.chdir(project / "src")
    for out in (project, Path(".."), Path("../..")):
        with pytest.raises(FileExistsError, match="the current directory or holds it"):
            check_output_dir(out, overwrite=True)
    assert (project / "thesis.tex").read_text() == "mine" and (project / "src").is_dir()


def test_a_stopped_save_inside_an_empty_output_is_named(tmp_path):
    """A save staged inside an empty --out (a mount point) and killed leaves only its hidden staging folder:
    named, with the remedy, rather than 'pass --overwrite' and then 'holds no checkpoint'."""
    out = tmp_path / "mnt"
    (out / ".mnt.tmp-abcd1234").mkdir(parents=True)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"holds only \.mnt\.tmp-abcd1234, left by a save that was stopped"):
            check_output_dir(out, overwrite)


def test_a_save_in_progress_inside_an_empty_output_is_not_called_stopped(tmp_path):
    """Another run saving into the same empty --out right now holds its staging folder's lock: named as in
    progress, not as a killed save's leftovers to delete."""
    from sdsengine.checkpoint import staged_directory
    out = tmp_path / "mnt"
    out.mkdir()
    with staged_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="being written by another sdsengine run right now"):
                check_output_dir(out, overwrite)
    assert (out / "config.json").exists()


def test_a_stopped_save_beside_the_output_is_named_and_a_live_one_is_not(tmp_path):
    """A save killed before its result went in place leaves a hidden staging folder beside --out (a whole
    copy of the model) that nothing else named; the next run to that --out names it. One a live run holds is
    not named, and neither is deleted."""
    from sdsengine.checkpoint import staged_directory
    out, stopped = tmp_path / "out", tmp_path / ".out.tmp-abcd1234"
    stopped.mkdir()
    with pytest.warns(UserWarning, match=r"\.out\.tmp-abcd1234: left beside .* by a save that was stopped"):
        check_output_dir(out)
    stopped.rename(tmp_path / "kept")
    with staged_directory(out) as live, warnings.catch_warnings():
        warnings.simplefilter("error")
        check_output_dir(tmp_path / "out")
        assert live.parent == tmp_path
    assert (tmp_path / "kept").is_dir()


def test_a_save_never_replaces_what_another_run_saved_meanwhile(tmp_path):
    """Two runs to one --out, both having found it new (or empty): the one finishing second is not saved
    there, naming why, and the other's checkpoint stays (it was replaced, both runs reporting success); its
    own finished result is kept under a name of its own. With overwrite the last one replaces it whole,
    leaving no earlier copy behind, except where it staged inside the output (a mount point)."""
    from sdsengine.checkpoint import staged_directory

    def other_run_saves(out):
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text('"other"')
    for out, overwrite, remedy in ((tmp_path / "new", False, "pass --overwrite to replace it"),
                                   (tmp_path / "empty", False, "pass --overwrite to replace it"),
                                   (tmp_path / "mnt", True, "an output this run staged inside cannot be replaced")):
        if out.name != "new":
            out.mkdir()
        with pytest.raises(FileExistsError, match=f"{out} was filled by another run while this one worked, so this "
                                                  f"run's result is not saved there \\({remedy}\\): it is kept in"):
            with staged_directory(out, overwrite) as tmp:
                (tmp / "config.json").write_text('"mine"')
                other_run_saves(out)
        assert json.loads((out / "config.json").read_text()) == "other"
        kept = [p for p in (out.parent if out.name == "new" else out).iterdir() if ".unsaved-" in p.name]
        assert len(kept) == 1 and json.loads((kept[0] / "config.json").read_text()) == "mine"
    out = tmp_path / "new"
    with staged_directory(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text('"mine"')
        save_checkpoint(tiny_model("gpt2"), None, out, {"run": "third"}, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == "mine" and not (out / REPORT_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_save_waits_for_another_putting_its_result_in_place(tmp_path):
    """The check and the swap run under a lock on the output's parent: a save ending while another process
    holds it waits, then finds what that one saved, and does not replace it (a child process stands in for
    the other run: it takes the lock, saves after a pause, and lets go)."""
    import subprocess
    import sys
    from sdsengine.checkpoint import staged_directory
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", f"""
import json, time
from pathlib import Path
from sdsengine import locks
out = Path({str(out)!r})
with locks.exclusive(out.parent, out.name):
    print("locked", flush=True)
    time.sleep(1.5)
    out.mkdir()
    (out / "config.json").write_text('"other"')
"""], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "locked\n"
    with pytest.raises(FileExistsError, match="filled by another run while this one worked"):
        with staged_directory(out) as tmp:
            (tmp / "config.json").write_text('"mine"')
    assert other.wait(timeout=60) == 0 and json.loads((out / "config.json").read_text()) == "other"


def test_overwrite_replaces_a_compressed_checkpoint_of_any_model(tmp_path):
    """save_compressed of a model that is not from transformers writes no config.json: its manifest marks it."""
    from sdsengine.nn import SparseLinear, save_compressed
    linear = torch.nn.Linear(64, 32).half()
    with torch.no_grad():
        linear.weight[:, 0::2] = 0
    model = torch.nn.Sequential(SparseLinear.from_linear(linear))
    out = save_compressed(model, tmp_path / "packed")
    assert not (out / "config.json").exists()
    assert save_compressed(model, out, overwrite=True) == out


def test_no_home_directory_is_no_reason_to_fail(tmp_path, monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    out = save_checkpoint(tiny_model("gpt2"), None, tmp_path / "out", {"run": 1})
    assert save_checkpoint(tiny_model("gpt2"), None, out, {"run": 2}, overwrite=True) == out


def test_a_full_disk_while_saving_is_named_and_changes_nothing(tmp_path):
    """safetensors reports a full disk as its own SafetensorError: the error names the output, and an
    earlier checkpoint there stays."""
    from safetensors import SafetensorError
    out = save_checkpoint(tiny_model("gpt2"), None, tmp_path / "out", {"run": 1})

    class FullDisk(torch.nn.Module):
        def save_pretrained(self, path, **kwargs):
            (path / "model.safetensors").write_bytes(b"part")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(OSError, match=f"could not write {out} .*No space left.*nothing was written"):
        save_checkpoint(FullDisk(), None, out, {"run": 2}, overwrite=True)
    assert json.loads((out / REPORT_NAME).read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_earlier_checkpoint_that_cannot_be_removed_is_named(tmp_path, monkeypatch):
    out = save_checkpoint(tiny_model("gpt2"), None, tmp_path / "out", {"run": 1})
    monkeypatch.setattr("sdsengine.checkpoint.shutil.rmtree", lambda path, ignore_errors=False: None)
    with pytest.warns(UserWarning, match=r"earlier contents at .*\.out\.old-.* could not all be removed"):
        save_checkpoint(tiny_model("gpt2"), None, out, {"run": 2}, overwrite=True)
    assert json.loads((out / REPORT_NAME).read_text()) == {"run": 2}


def test_an_empty_directory_is_filled_in_place(tmp_path):
    """An empty --out may be a mount point, which cannot be renamed or removed: it is filled, not replaced."""
    out = tmp_path / "mnt"
    out.mkdir()
    inode = out.stat().st_ino
    save_checkpoint(tiny_model("llama"), None, out, {"x": 1})
    assert out.stat().st_ino == inode and (out / REPORT_NAME).exists() and (out / "config.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left inside


def test_output_directory_mode_follows_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        out = save_checkpoint(tiny_model("llama"), None, tmp_path / "new", {})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_a_failed_move_leaves_the_empty_directory_empty(tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    calls = []
    real_rename = type(out).rename

    def flaky(self, target):
        calls.append(self.name)
        if len(calls) == 2 and self.parent.name.startswith(".mnt.tmp-"):
            raise OSError("no space left")
        return real_rename(self, target)
    monkeypatch.setattr(type(out), "rename", flaky)
    with pytest.raises(OSError, match="no space left"):
        save_checkpoint(tiny_model("llama"), None, out, {})
    assert list(out.iterdir()) == [] and list(tmp_path.iterdir()) == [out]


def test_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("sdsengine.checkpoint.os.access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=f"cannot write {tmp_path / 'a' / 'out'}: {tmp_path} is not writable"):
        check_output_dir(tmp_path / "a" / "out")
