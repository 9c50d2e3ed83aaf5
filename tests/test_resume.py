"""Resumable runs: a run stopped after some layers and started again ends where an unbroken run ends."""
import fcntl
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine import locks
from sdsengine.algorithms import algorithm_for
from sdsengine.checkpoint import save_checkpoint
from sdsengine.config import SDSConfig, SparseGPTConfig, WandaConfig
from sdsengine.pipeline import adapters, resume, sequential
from sdsengine.pipeline.resume import MANIFEST, ResumeStore
from tiny_models import tiny_config, tiny_tokens


def _model(seed=0):
    torch.manual_seed(seed)
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    return AutoModelForCausalLM.from_config(config).eval()


def _config(kind):
    if kind == "sparsegpt":
        return SparseGPTConfig(sparsity="2:4", blocksize=16)
    return SDSConfig(sparsity="2:4", base="wanda", iters=5, refit=3, teacher="dense")  # carries the dense stream


class _Stop(BaseException):  # as a kill would: no handler of Exception catches it
    pass


def _stop_at(monkeypatch, index):
    """Make the pipeline fail when it reaches layer `index`, as a killed run would stop there."""
    real = sequential._prune_layer
    calls = []

    def prune_layer(i, *args, **kwargs):
        calls.append(i)
        if i == index:
            raise _Stop
        return real(i, *args, **kwargs)
    monkeypatch.setattr(sequential, "_prune_layer", prune_layer)
    return calls


def _stop_before_manifest(monkeypatch, nth, config, samples, progress):
    """A prune that stops as its nth layer's manifest was about to replace the last one: a kill while saving."""
    real_replace, manifests = resume.os.replace, []

    def replace(src, dst):
        if Path(dst).name == MANIFEST:
            manifests.append(dst)
            if len(manifests) == nth + 1:  # the first says no layer is done
                raise _Stop
        real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(resume.os, "replace", replace)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)


def _untimed(steps):
    """A layer's step info without the seconds each step took (SDS reports them), which no two runs share."""
    return {name: {k: v for k, v in info.items() if k != "seconds"} for name, info in steps.items()}


def _layer_weights(model):
    return [{n: adapters.get_weight(m).clone() for n, m in adapters.linear_modules(layer).items()}
            for layer in adapters.decoder_layers(model)]


@pytest.mark.parametrize("kind", ["sparsegpt", "sds"])
def test_stopped_then_resumed_run_equals_an_unbroken_run(tmp_path, monkeypatch, kind):
    # SDS re-fits only with as many tokens as inputs (128 for the down projection): 3 x 48
    config, samples = _config(kind), tiny_tokens(3, 48 if kind == "sds" else 16)
    if kind == "sds":
        assert algorithm_for(config).needs_dense_stream(config)
    unbroken = _model()
    expected = sdsengine.prune(unbroken, config, samples, progress=False)

    stopped = _model()
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(_Stop):
            sdsengine.prune(stopped, config, samples, progress=False, resume_dir=tmp_path / "progress")
    resumed = _model()  # a fresh process: the original weights again
    with monkeypatch.context() as m:
        calls = _stop_at(m, -1)
        result = sdsengine.prune(resumed, config, samples, progress=False, resume_dir=tmp_path / "progress")
    assert calls == [2]  # layers 0 and 1 came from the progress directory
    assert result.report["resumed"]["from_layer"] == 2
    for got, want in zip(_layer_weights(resumed), _layer_weights(unbroken)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert [r.error for r in result.layers] == [r.error for r in expected.layers]
    assert [_untimed(r.steps) for r in result.layers] == [_untimed(r.steps) for r in expected.layers]


@pytest.mark.parametrize("legacy", [False, True])
def test_a_run_stopped_while_saving_resumes(tmp_path, monkeypatch, legacy):
    """Stopped after layer 1's activations were written but before the manifest said so: the run goes on
    from layer 1, and ends as the unbroken run. legacy: progress saved before the activations file was named
    by its layer count (activations.pt, not in the manifest) resumes too."""
    config, samples = _config("sparsegpt"), tiny_tokens(3, 16)
    unbroken = _model()
    sdsengine.prune(unbroken, config, samples, progress=False)
    progress = tmp_path / "progress"
    _stop_before_manifest(monkeypatch, 2, config, samples, progress)
    if legacy:
        (progress / "activations-0001.pt").rename(progress / "activations.pt")
        (progress / "activations-0002.pt").unlink()
        manifest = json.loads((progress / MANIFEST).read_text())
        del manifest["activations"]
        (progress / MANIFEST).write_text(json.dumps(manifest))
    resumed = _model()
    with monkeypatch.context() as m:
        calls = _stop_at(m, -1)
        sdsengine.prune(resumed, config, samples, progress=False, resume_dir=progress)
    assert calls == [1, 2]
    for got, want in zip(_layer_weights(resumed), _layer_weights(unbroken)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert [p.name for p in progress.glob("activations*")] == ["activations-0003.pt"]  # older ones deleted
    (progress / "layer-0002.pt.tmp").write_text("a stopped save's leftover")
    ResumeStore(progress).clear()
    assert not progress.exists()


@pytest.mark.parametrize("model, config, tokens, named", [
    (lambda: _model(), WandaConfig(sparsity="4:8"), tiny_tokens(3, 16), "recipe: sparsity 2:4 there, 4:8 here"),
    (lambda: _model(), SparseGPTConfig(sparsity="2:4"), tiny_tokens(3, 16),
     "recipe: method wanda there, sparsegpt here"),
    (lambda: _model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16, seed=1),
     r"calibration: other tokens in as many windows \(another seed or data\)"),
    (lambda: _model(), WandaConfig(sparsity="2:4"), tiny_tokens(2, 16), "calibration: 3x16 windows there, 2x16 here"),
    (lambda: _model(seed=1), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), r"model: other weights \(another model"),
    (lambda: _model().to(torch.bfloat16), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16),
     "model: float32 weights there, bfloat16 here"),
])
def test_progress_of_another_run_is_refused_naming_the_difference(tmp_path, monkeypatch, model, config, tokens,
                                                                  named):
    with monkeypatch.context() as m:
        _stop_at(m, 1)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False,
                            resume_dir=tmp_path)
    with monkeypatch.context() as m:  # refused before the calibration inputs are captured
        m.setattr(sequential, "capture_layer_inputs", _must_not_run)
        with pytest.raises(ValueError, match=f"progress of another run \\({named}[^;]*\\); pass a new directory"):
            sdsengine.prune(model(), config, tokens, progress=False, resume_dir=tmp_path)


def test_progress_saved_before_its_run_was_described_is_refused_all_the_same(tmp_path, monkeypatch):
    """A manifest without the run's parts (written before they were kept) still resumes its own run, and
    refuses another in general terms."""
    samples = tiny_tokens(3, 16)
    with monkeypatch.context() as m:
        _stop_at(m, 1)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["run"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"another run \(a different recipe, calibration data or model\)"):
        sdsengine.prune(_model(), WandaConfig(sparsity="4:8"), samples, progress=False, resume_dir=tmp_path)
    result = sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path)
    assert result.report["resumed"]["from_layer"] == 1


def _must_not_run(*args, **kwargs):
    raise AssertionError("the calibration inputs were captured before the progress was checked")


def test_directory_holding_other_files_is_refused_and_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no sdsengine progress"):
        sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False,
                        resume_dir=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_clear_removes_only_the_progress(tmp_path):
    progress = tmp_path / "progress"
    sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False,
                    resume_dir=progress)
    assert (progress / MANIFEST).exists() and len(list(progress.glob("layer-*.pt"))) == 3
    ResumeStore(progress).clear()
    assert not progress.exists()


def test_a_first_save_stopped_before_its_manifest_starts_over(tmp_path, monkeypatch):
    """Killed while writing layer 0's progress (its weights and activations written, or half of one, the
    manifest not yet): the same command starts over from layer 0 and ends as the unbroken run."""
    config, samples = _config("sparsegpt"), tiny_tokens(3, 16)
    unbroken = _model()
    sdsengine.prune(unbroken, config, samples, progress=False)
    progress = tmp_path / "progress"
    _stop_before_manifest(monkeypatch, 1, config, samples, progress)
    (progress / "activations-0002.pt.tmp").write_text("half written")
    assert json.loads((progress / MANIFEST).read_text())["done"] == 0 and (progress / "layer-0000.pt").exists()
    resumed = _model()
    with monkeypatch.context() as m:
        calls = _stop_at(m, -1)
        sdsengine.prune(resumed, config, samples, progress=False, resume_dir=progress)
    assert calls == [0, 1, 2]
    for got, want in zip(_layer_weights(resumed), _layer_weights(unbroken)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert not list(progress.glob("*.tmp"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / MANIFEST).write_text("{bad"), r"progress.json is damaged \(not valid JSON"),
    (lambda d: (d / MANIFEST).write_text("{}"), r"progress.json is damaged \(not sdsengine progress\)"),
    (lambda d: (d / "layer-0000.pt").write_bytes(b"trunc"), r"layer-0000.pt does not load .*delete the directory"),
])
def test_damaged_progress_is_named(tmp_path, monkeypatch, damage, message):
    samples = tiny_tokens(3, 16)
    with monkeypatch.context() as m:
        _stop_at(m, 1)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path)


def test_a_directory_of_files_that_only_look_like_progress_is_refused_and_kept(tmp_path):
    """Only the exact names the store writes are its own: a user's layer-17.pt, notes.tmp or a folder named
    cache.tmp make the directory foreign, refused before any work, and nothing in it is touched."""
    (tmp_path / "layer-17.pt").write_text("mine")
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / "cache.tmp").mkdir()
    with pytest.raises(FileExistsError, match="holds no sdsengine progress"):
        ResumeStore(tmp_path).check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.tmp", "layer-17.pt", "notes.tmp"]


def test_a_directory_of_the_users_files_under_the_stores_names_is_refused_and_kept(tmp_path):
    """Without the store's progress.json (a run writes it before anything else), even files named as the
    store names its own (activations.pt, layer-0000.pt) are the user's: refused, and nothing deleted."""
    for name in ("activations.pt", "layer-0000.pt", "progress.json.tmp"):
        (tmp_path / name).write_text("mine")
    with pytest.raises(FileExistsError, match="holds no sdsengine progress .*named as those of a save stopped in "
                                              "its first layer by sdsengine before 2026-12-02"):
        sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False,
                        resume_dir=tmp_path)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["mine"] * 3


def test_a_run_stopped_in_its_first_layer_and_changed_says_nothing_is_lost(tmp_path, monkeypatch):
    """Out of memory in layer 0, then run again with other settings: refused (a run still in its first layer
    there must not be mixed with), saying that deleting the directory loses nothing."""
    with monkeypatch.context() as m:
        _stop_at(m, 0)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False,
                            resume_dir=tmp_path)
    with pytest.raises(ValueError, match="another run .*with no layer finished yet, so deleting it loses nothing"):
        sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(2, 16), progress=False,
                        resume_dir=tmp_path)


def test_an_unwritable_resume_directory_is_named_before_any_work(tmp_path, monkeypatch):
    writable = resume.os.access
    monkeypatch.setattr(resume.os, "access", lambda path, mode: Path(path) != tmp_path and writable(path, mode))
    with pytest.raises(PermissionError, match=f"resume directory {tmp_path / 'new'}: {tmp_path} is not a writable"):
        ResumeStore(tmp_path / "new").check()


def test_a_failed_write_names_the_file_and_keeps_the_progress_saved_before(tmp_path, monkeypatch):
    """A full disk while saving layer 1 (torch.save's own error names neither file nor disk): the error names
    the directory and file, no temporary file stays, and the same command resumes from layer 1."""
    config, samples = WandaConfig(sparsity="2:4"), tiny_tokens(3, 16)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if Path(path).name.startswith("layer-0001"):
            Path(path).write_bytes(b"part")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        real_save(obj, path, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(resume.torch, "save", full_disk)
        with pytest.raises(OSError, match=f"resume directory {tmp_path}: could not write layer-0001.pt "
                                          r"\(\[enforce fail.*the progress saved before it is kept"):
            sdsengine.prune(_model(), config, samples, progress=False, resume_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and json.loads((tmp_path / MANIFEST).read_text())["done"] == 1
    with monkeypatch.context() as m:
        calls = _stop_at(m, -1)
        sdsengine.prune(_model(), config, samples, progress=False, resume_dir=tmp_path)
    assert calls == [1, 2]


def test_a_run_that_began_in_the_directory_after_this_one_looked_is_refused(tmp_path):
    """Two runs started together on one empty directory: the second to begin finds the first's progress,
    written before any layer, and stops instead of mixing its layers in."""
    first, second = (ResumeStore(tmp_path) for _ in range(2))
    first.identify(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16))
    second.identify(_model(), WandaConfig(sparsity="4:8"), tiny_tokens(3, 16))
    layers = adapters.decoder_layers(_model())
    assert first.begin(layers, None, None, None) == []
    with pytest.raises(ValueError, match="progress of another run"):
        second.begin(layers, None, None, None)


def _held_by_another_process(directory):
    """flock locks belong to an open file description: one opened here stands for another process's."""
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_directory_another_run_is_resuming_is_refused_and_kept(tmp_path, monkeypatch):
    """The same command started twice on one progress (a job resubmitted while the first still runs): the
    second is refused before any work and the progress stays as it was (both resumed it, wrote the same
    files, and the first to finish deleted the directory under the other); free again once the other ends."""
    config, samples = WandaConfig(sparsity="2:4"), tiny_tokens(3, 16)
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), config, samples, progress=False, resume_dir=tmp_path)
    locks.release(locks.held(tmp_path))  # the stopped run's process ended...
    other = _held_by_another_process(tmp_path)  # ...and another is resuming its progress now
    try:
        kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        with monkeypatch.context() as m:
            m.setattr(sequential, "capture_layer_inputs", _must_not_run)
            with pytest.raises(RuntimeError, match=f"resume directory {tmp_path} is in use by another sdsengine run "
                                                   r".*a Python process whose sdsengine\.prune used it holds it until "
                                                   r"ResumeStore\(dir\)\.clear\(\)"):
                sdsengine.prune(_model(), config, samples, progress=False, resume_dir=tmp_path)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept
    finally:
        os.close(other)
    result = sdsengine.prune(_model(), config, samples, progress=False, resume_dir=tmp_path)
    assert result.report["resumed"]["from_layer"] == 2
    fd = locks.held(tmp_path)
    ResumeStore(tmp_path).clear()
    assert fd is not None and fd not in locks._holding.values() and not tmp_path.exists()


def test_a_run_stopped_after_saving_its_checkpoint_names_its_finished_progress(tmp_path, capsys):
    """Killed between the checkpoint's save and the progress's removal: the same command is refused at --out,
    and says that the progress left behind (a model's worth of files) holds a finished run."""
    from sdsengine.cli import main
    progress, out = tmp_path / "progress", tmp_path / "out"
    sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False, resume_dir=progress)
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["prune", "--method", "wanda", "--sparsity", "2:4", "--out", str(out),
                 "--resume-dir", str(progress)]) == 2
    assert (f"is not empty; pass --overwrite (overwrite=True in Python) to replace it; --resume-dir {progress} holds "
            f"a run with all 3 layers done, as a run stopped after saving its checkpoint leaves it: if {out} is that "
            f"checkpoint, delete {progress}") in capsys.readouterr().err
    assert (progress / MANIFEST).exists()


@pytest.mark.parametrize("name", ["layer-0001.pt", "activations-0002.pt"])
def test_a_file_from_another_runs_progress_is_refused(tmp_path, monkeypatch, name):
    """A layer's or the activations' file copied in from another run's progress (the same architecture, so it
    would load): refused by name, not mixed into this run."""
    samples = tiny_tokens(3, 16)
    for directory, seed in (("mine", 0), ("other", 1)):
        with monkeypatch.context() as m:
            _stop_at(m, 2)
            with pytest.raises(_Stop):
                sdsengine.prune(_model(seed), WandaConfig(sparsity="2:4"), samples, progress=False,
                                resume_dir=tmp_path / directory)
    (tmp_path / "other" / name).replace(tmp_path / "mine" / name)
    with pytest.raises(ValueError, match=f"{name} was written by another run .* than its progress.json"):
        sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path / "mine")


def test_layer_files_saved_before_they_carried_the_fingerprint_resume(tmp_path, monkeypatch):
    """Progress written before the files carried the run's fingerprint (a bare state dict per layer, activations
    without it) still resumes."""
    samples = tiny_tokens(3, 16)
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path)
    for path in tmp_path.glob("*.pt"):
        saved = torch.load(path)
        torch.save(saved["state"] if path.name.startswith("layer") else
                   {k: v for k, v in saved.items() if k != "fingerprint"}, path)
    unbroken = _model()
    sdsengine.prune(unbroken, WandaConfig(sparsity="2:4"), samples, progress=False)
    resumed = _model()
    result = sdsengine.prune(resumed, WandaConfig(sparsity="2:4"), samples, progress=False, resume_dir=tmp_path)
    assert result.report["resumed"]["from_layer"] == 2
    for got, want in zip(_layer_weights(resumed), _layer_weights(unbroken)):
        for name in want:
            assert torch.equal(got[name], want[name])


def test_a_cpu_run_resumed_with_another_thread_count_says_it_will_not_match(tmp_path, monkeypatch):
    """CPU results differ in the last bits between thread counts: resumed with another count, a run matches
    neither uninterrupted run, so the resume says so (it goes on: a job may land on another machine)."""
    config, samples, progress = _config("sparsegpt"), tiny_tokens(3, 16), tmp_path / "progress"
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    with pytest.warns(UserWarning, match=f"saved with {threads} threads on {threads + 1}"):
        result = sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)
    assert result.report["resumed"]["from_layer"] == 2


def test_finished_layers_whose_manifest_is_gone_are_not_called_worthless(tmp_path):
    """A directory of several finished layers' files without progress.json is refused (nothing to resume
    from), but not with 'deleting it loses nothing', which holds only for a first layer's leftovers."""
    for name in ("layer-0000.pt", "layer-0001.pt", "activations-0002.pt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(FileExistsError, match="named as 2 finished layers of a run whose progress.json is gone"):
        ResumeStore(tmp_path).check()
    (tmp_path / "layer-0001.pt").unlink()
    with pytest.raises(FileExistsError, match="deleting it loses nothing"):
        ResumeStore(tmp_path).check()


def test_an_empty_layer_file_is_named_as_empty(tmp_path, monkeypatch):
    config, samples, progress = _config("sparsegpt"), tiny_tokens(3, 16), tmp_path / "progress"
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)
    (progress / "layer-0001.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"layer-0001.pt does not load \(it is empty\)"):
        sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)


def test_a_checkpoint_saved_inside_the_resume_directory_it_holds_does_not_wait_on_itself(tmp_path):
    """--out inside --resume-dir (one folder per job): the save's lock on --out's parent, the resume directory,
    waited forever on the lock this same process holds on it. Run in a thread, so that a wait fails the test."""
    progress = tmp_path / "job"
    model = _model()
    result = sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(3, 16), progress=False,
                             resume_dir=progress)
    save = threading.Thread(target=save_checkpoint, args=(model, None, progress / "pruned", result.report),
                            daemon=True)
    save.start()
    save.join(timeout=60)
    assert not save.is_alive(), "the save waits on the resume directory's lock, which this process holds"
    assert (progress / "pruned" / "config.json").is_file()
    ResumeStore(progress).clear()
    assert sorted(p.name for p in progress.iterdir()) == ["pruned"]


def test_a_resume_directory_deleted_and_made_again_is_held_again(tmp_path, monkeypatch):
    """A process that pruned into a directory (held until clear()), which was then deleted by hand and used again:
    the new directory was taken as held already, so no lock kept another process out of it."""
    progress, config, samples = tmp_path / "progress", WandaConfig(sparsity="2:4"), tiny_tokens(3, 16)
    sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)
    shutil.rmtree(progress)
    with monkeypatch.context() as m:
        _stop_at(m, 1)
        with pytest.raises(_Stop):
            sdsengine.prune(_model(), config, samples, progress=False, resume_dir=progress)
    with pytest.raises(BlockingIOError):
        os.close(_held_by_another_process(progress))
    fd = locks.held(progress)
    ResumeStore(progress).clear()
    assert fd is not None and fd not in locks._holding.values() and not progress.exists()


def test_a_directory_another_run_is_resuming_is_refused_before_the_model_loads(tmp_path):
    """check(), which the CLI calls before loading the model: a resubmitted job was refused only after its model
    had loaded and been fingerprinted (minutes for a large one). The check holds nothing once done."""
    other = _held_by_another_process(tmp_path)
    try:
        with pytest.raises(RuntimeError, match=f"resume directory {tmp_path} is in use by another sdsengine run"):
            ResumeStore(tmp_path).check()
    finally:
        os.close(other)
    ResumeStore(tmp_path).check()
    os.close(_held_by_another_process(tmp_path))  # nothing left held by the check
    assert locks.held(tmp_path) is None
