"""Resumable runs: a long prune keeps its progress after every decoder layer, so a run that is stopped (a
preempted job, a lost session, an out-of-memory kill) goes on from the last finished layer instead of
starting over. A full-protocol SDS or BESA run on a CPU takes hours.

A run writes its progress.json (no layer done) before any other file, so a directory without one is never
taken for progress and nothing in it is deleted. Once layers 0..k are done, the directory holds: their
pruned weights (one file per layer), the activations layer k+1 reads (the pruned stream and, when the
method carries it, the dense stream; a file named by the layer count), and progress.json: a fingerprint of
the run (recipe, calibration tokens, original weights), how many layers are done, their reports, and which
activations file goes with them. Each file is written under a temporary name and renamed into place,
progress.json last, and the activations it no longer names are deleted only after it, so a run stopped at
any point while saving resumes from the layer before or the one just saved. Progress made with another
recipe, other calibration tokens or another model is refused, naming which of them differs (the manifest
keeps the recipe and digests of the tokens and weights), never mixed in.

In a data-parallel group (pipeline/parallel.py) the directory is shared by the processes (one machine, or a file
system they all see). The first process fingerprints the run, holds the directory, and writes the layers' weights and
the manifest; each process writes the activations of its own windows (activations-NNNN-RofP.pt) before the manifest
moves on to them. Progress is resumed by as many processes as made it (the number is in the fingerprint: each one's
windows, and the order of the sums, depend on it).
A run streamed from the checkpoint's files (streaming.py) fingerprints the files' tensors as the loaded model would hold
them, keeps each layer as the stream wrote it, and on resuming has the stream write the finished layers.
"""
import dataclasses
import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from sdsengine import locks
from sdsengine.files import unwritable

from . import parallel

MANIFEST = "progress.json"
LEGACY_ACTIVATIONS = "activations.pt"  # progress saved before the file was named by its layer count
OWN_FILE = re.compile(r"(layer-\d{4,}\.pt|activations-\d{4,}(-\d+of\d+)?\.pt|activations\.pt)(\.tmp)?"
                      r"|progress\.json\.tmp")


class ResumeStore:
    """One run's progress in `directory`: identify() the run, begin() before the first layer, save() after each.
    From identify() until clear() (or its end) the process holds the directory (locks.hold): another process is
    refused, so that no two resume the same progress at once."""

    def __init__(self, directory):
        self.dir = Path(directory).expanduser().resolve()
        self.fingerprint = None
        self.run = None  # the fingerprint's parts, to name what differs from another run's progress
        self.resumed_from = 0  # layers taken from an earlier run
        self.earlier_seconds = 0.0  # their pruning time, as that run measured it

    def check(self):
        """Fail before any work if the directory holds something other than sdsengine progress, or could not
        be written."""
        self._manifest()
        if blocked := unwritable(self.dir):
            raise PermissionError(f"resume directory {self.dir}: {blocked} is not a writable directory")
        # a resubmitted job: named before its model loads (by the first process of a group: it holds the directory
        # for the group, and the others' tries would meet its hold)
        if self.dir.is_dir() and locks.held(self.dir) is None and parallel.rank() == 0:
            if (fd := self._hold()) is not None:
                locks.release(fd)  # taken for good by identify()
        return self

    def identify(self, model, config, samples, weights=None):
        """Fingerprint the run (before any weight changes; `samples`: all the windows, of every process) and refuse
        another run's progress; called before the calibration inputs are captured, so a wrong directory is named
        before that work. In a group, the first process does it for all (it holds the weights). weights: a
        streaming.WeightStream, whose checkpoint tensors are fingerprinted instead of the (skeleton) model's."""
        self.fingerprint, self.run = parallel.from_first(self._identify, model, config, samples, weights)
        return self

    def _identify(self, model, config, samples, weights):
        tensors = weights.tensors() if weights is not None else model.state_dict().items()
        self.fingerprint, self.run = identity(tensors, config, samples)
        self._own_progress()
        self._lock()
        self._own_progress()  # again: another run may have begun here before the lock was taken
        return self.fingerprint, self.run

    def _lock(self):
        """Hold the directory (made here if new: a lock needs it) for this process, or refuse it where another
        process holds it: two runs resuming one progress each wrote the same files and the first to finish
        deleted the directory under the other."""
        if locks.held(self.dir) is not None:  # not if deleted since (not by clear()) and made anew
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._hold()

    def _hold(self):
        """locks.hold() on the directory, refused by name where another process holds it."""
        try:
            return locks.hold(self.dir)
        except BlockingIOError:
            raise RuntimeError(f"resume directory {self.dir} is in use by another sdsengine run right now (still "
                               "running, or started twice; a Python process whose sdsengine.prune used it holds it "
                               "until ResumeStore(dir).clear() or its end): wait for it to end, or pass another "
                               "directory") from None

    def begin(self, layers, inps, dense, report_type, weights=None) -> list:
        """After identify(): if the directory holds this run's progress, load it into `layers`, `inps` and
        `dense` and return the finished layers' reports, else return []. weights: a streaming.WeightStream, which
        writes the finished layers to its output instead (the model is a skeleton)."""
        if self.fingerprint is None:
            raise RuntimeError("ResumeStore.begin() before identify()")
        manifest = parallel.from_first(self._started, len(layers))
        if manifest is None:
            return []
        done = manifest["done"]
        _warn_other_threads(manifest.get("run") or {}, self.run)
        for i in range(done):
            if weights is not None:
                weights.write_layer(layers[i], self._ours(self._layer_file(i), mmap=True)["state"])
            elif not parallel.is_skeleton(layers[i]):  # data-parallel: a skeleton's layers are the first process's
                layers[i].load_state_dict(self._ours(self._layer_file(i))["state"])
        name = manifest.get("activations", LEGACY_ACTIVATIONS) if parallel.world() == 1 else None
        activations = self.dir / name if name else self._activations_file(done)
        saved = self._ours(activations, mmap=True)  # copied in below: no 2nd copy
        if saved["done"] != done:
            raise ValueError(f"resume directory {self.dir}: activations after layer {saved['done']} do not "
                             f"match the {done} layers recorded as done; delete the directory")
        inps.copy_(saved["inps"])
        if dense is not None:
            dense.inps.copy_(saved["dense"])
        reports = [report_type(**r) for r in manifest["reports"]]
        self.resumed_from = done
        self.earlier_seconds = sum(r.seconds for r in reports)
        return reports

    def _started(self, layers):
        """This run's manifest with some layers done, else None once a new run's manifest is written."""
        manifest = self._own_progress()  # again: another run may have begun here since identify()
        if manifest is None or manifest["done"] == 0:
            self._start(layers)
            return None
        return manifest

    def _own_progress(self):
        """This run's manifest, None if the directory holds none; refuses another run's."""
        manifest = self._manifest()
        if manifest is not None and manifest["fingerprint"] != self.fingerprint:
            # done 0: stopped in its first layer (out of memory, say) and run again with other settings; or a run
            # that began there and is still on its first layer: not to be mixed with, so refused all the same
            started = (" with no layer finished yet, so deleting it loses nothing (unless that run is still going)"
                       if manifest["done"] == 0 else "")
            raise ValueError(f"resume directory {self.dir} holds the progress of another run "
                             f"({'; '.join(differences(manifest.get('run'), self.run))}){started}; pass a new "
                             "directory or delete that one")
        return manifest

    def _start(self, layers):
        """A new run: the manifest first, so the directory is known as progress before anything is written;
        what a first save stopped before its manifest moved on left behind goes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self._own_files():
            path.unlink()
        self._write_manifest({"fingerprint": self.fingerprint, "run": self.run, "done": 0, "layers": layers,
                              "activations": None, "reports": []})

    def save(self, layers, reports, inps, dense, weights=None):
        """After layer len(reports)-1: its weights (a stream's as it wrote them), the next layer's inputs (each
        process its own), then the manifest, once every process's files are written."""
        done = len(reports)
        activations = self._activations_file(done)
        error = None
        try:
            if parallel.rank() == 0:
                state = weights.written(layers[done - 1]) if weights is not None else layers[done - 1].state_dict()
                layer = {"fingerprint": self.fingerprint, "state": state}
                self._write(self._layer_file(done - 1), functools.partial(torch.save, layer))
            saved = {"fingerprint": self.fingerprint, "done": done, "inps": inps,
                     "dense": dense.inps if dense is not None else None}
            self._write(activations, functools.partial(torch.save, saved))
        except OSError as exc:  # (a full disk) raised in every process of a group, none left waiting
            error = exc
        parallel.raised_anywhere(error)
        parallel.from_first(self._write_manifest, {
            "fingerprint": self.fingerprint, "run": self.run, "done": done, "layers": len(layers),
            "activations": activations.name, "reports": [dataclasses.asdict(r) for r in reports]})
        for older in self._activations_files():  # only now: until the manifest moved on, they were its
            if older != activations:
                older.unlink(missing_ok=True)  # the first process's clear() may be deleting them already

    def finished(self):
        """The number of layers where the progress here has them all done (what a run stopped after saving its
        checkpoint leaves), else None; None too for a directory that holds no readable progress."""
        try:
            manifest = self._manifest()
        except (ValueError, OSError):  # not progress: check() names it
            return None
        return manifest["done"] if manifest and manifest["done"] == manifest.get("layers") else None

    def clear(self):
        """Remove the files this store wrote, and the directory once empty (call after the model is saved)."""
        fd = locks.held(self.dir)  # now: once the directory is removed, its path finds no lock
        try:
            if not (self.dir / MANIFEST).exists():
                return
            for path in [self.dir / MANIFEST, *self._own_files()]:
                path.unlink(missing_ok=True)
            if not any(self.dir.iterdir()):
                self.dir.rmdir()
        finally:  # only now: until its files are gone the directory is this run's
            if fd is not None:
                locks.release(fd)

    def _manifest(self):
        """The saved progress, None for a new run; refuses a directory that holds anything else."""
        path = self.dir / MANIFEST
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is damaged (not valid JSON: {exc.msg}); delete {self.dir} to start "
                                 "over") from None
            if not isinstance(manifest, dict) or not {"fingerprint", "done", "reports"} <= manifest.keys():
                raise ValueError(f"{path} is damaged (not sdsengine progress); delete {self.dir} to start over")
            return manifest
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise FileExistsError(f"resume directory {self.dir} exists and holds no sdsengine progress (no "
                                  f"{MANIFEST}); pass an empty or new directory{self._what_is_here()}")
        return None

    def _what_is_here(self):
        """For the refusal of a directory without a manifest: what its files look like, where they are all named
        as ours. One layer at most is what a save stopped in its first layer by sdsengine before 2026-12-02
        (which wrote progress.json last) left; more are finished layers whose manifest is gone."""
        own = self._own_files()
        if not own or len(own) != len(list(self.dir.iterdir())):
            return ""
        layers = sum(p.name.startswith("layer-") for p in own)
        if layers > 1:
            return (f" (its files are named as {layers} finished layers of a run whose {MANIFEST} is gone: without "
                    "it they cannot be resumed)")
        return (" (its files are named as those of a save stopped in its first layer by sdsengine before "
                "2026-12-02, which wrote progress.json last: if so, deleting it loses nothing)")

    def _write_manifest(self, manifest):
        self._write(self.dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest)))

    def _write(self, path, write):
        """write(tmp), then tmp renamed to path: a file is there whole or not at all. A failure (a full or
        read-only disk) names the file, and the progress saved before it stays."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            write(tmp)
            os.replace(tmp, path)
        except Exception as exc:  # torch.save's own errors are RuntimeErrors naming neither file nor disk
            tmp.unlink(missing_ok=True)
            raise OSError(f"resume directory {self.dir}: could not write {path.name} ({exc}); the progress saved "
                          "before it is kept") from exc

    def _own_files(self):
        """Every file but the manifest this store writes, and a stopped save's temporary files: by their exact
        names (a user's layer-17.pt or notes.tmp is not ours)."""
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.iterdir() if OWN_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink()]

    def _ours(self, path, mmap=False):
        """A layer's or the activations' file, refused where another run wrote it (a file copied in from
        another progress directory would otherwise be loaded as this run's). Files saved before they carried
        the fingerprint (a layer's bare state dict) are taken on the manifest's word."""
        saved = self._load(path, mmap)
        if "fingerprint" not in saved:  # a state dict's keys are parameter names: never "fingerprint"
            return saved if "done" in saved else {"state": saved}
        if saved["fingerprint"] != self.fingerprint:
            raise ValueError(f"resume directory {self.dir}: {path.name} was written by another run (a different "
                             "recipe, calibration data or model) than its progress.json; delete the directory to "
                             "start over")
        return saved

    def _load(self, path, mmap=False):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap)
        except Exception as exc:  # a truncated or missing file: torch names neither the file nor the remedy
            why = "it is empty" if path.is_file() and path.stat().st_size == 0 else exc  # torch's text is ''
            raise ValueError(f"resume directory {self.dir}: {path.name} does not load ({why}); delete the "
                             "directory to start over") from exc

    def _layer_file(self, index):
        return self.dir / f"layer-{index:04d}.pt"

    def _activations_file(self, done):
        """This process's activations after `done` layers."""
        return self.dir / f"activations-{done:04d}{_process()}.pt"

    def _activations_files(self):
        """This process's activations files (in a group, each process deletes its own)."""
        mine = re.compile(rf"activations(-\d{{4,}}{_process()})?\.pt")
        return [p for p in self._own_files() if mine.fullmatch(p.name)]


def _process():
    """How this process's activations files are told apart from the others' in a group: -RofP."""
    return f"-{parallel.rank()}of{parallel.world()}" if parallel.world() > 1 else ""


def fingerprint(model, config, samples) -> str:
    """What the result depends on: the recipe, the calibration tokens and the original weights (each
    tensor's name, shape, dtype and two sums: cheap, and any different checkpoint changes them)."""
    return identity(model.state_dict().items(), config, samples)[0]


def identity(tensors, config, samples):
    """(fingerprint, parts) of the run on the model's (name, tensor) pairs `tensors`: the parts (the recipe, and
    digests of the calibration tokens and of the weights) are kept in the manifest so that a refusal can name what
    differs; the fingerprint is unchanged by them, so progress saved before they were kept still resumes."""
    recipe = json.dumps(config.to_dict(), sort_keys=True, default=str)
    tokens = samples.cpu().numpy().tobytes()
    h, weights, dtypes = hashlib.sha256(recipe.encode()), hashlib.sha256(), set()
    h.update(tokens)
    if parallel.world() > 1:  # each process's windows and the sums' order depend on it (one process: as before)
        h.update(f"processes {parallel.world()}".encode())
    with torch.no_grad():
        for name, t in tensors:
            total, absolute = _sums(t)
            line = f"{name}{tuple(t.shape)}{t.dtype}{total!r}{absolute!r}".encode()
            h.update(line)
            weights.update(line)
            dtypes.add(str(t.dtype).removeprefix("torch."))
    parts = {"recipe": json.loads(recipe),
             "calibration": {"windows": list(samples.shape), "sha256": hashlib.sha256(tokens).hexdigest()},
             "model": {"dtypes": sorted(dtypes), "sha256": weights.hexdigest()},
             "threads": torch.get_num_threads(),  # not in the fingerprint: a resume may change it (with a warning)
             "processes": parallel.world()}
    return h.hexdigest(), parts


def _warn_other_threads(saved, current):
    """CPU results differ in the last bits between thread counts (BLAS splits its sums by them): a CPU run
    resumed with another count matches neither an uninterrupted run with the first nor one with the second.
    Allowed (a resumed job may land on another machine), but said."""
    before, now = saved.get("threads"), current["threads"]
    if before is not None and before != now and str(current["recipe"].get("device", "cpu")).startswith("cpu"):
        warnings.warn(f"resuming a CPU run saved with {before} threads on {now}: the layers still to prune will not "
                      "match bit for bit the run it would have been (set torch's threads, OMP_NUM_THREADS, to "
                      f"{before} for that)")


def differences(saved, current) -> list[str]:
    """What sets the progress's run (`saved` parts, None where its manifest predates them) apart from this one."""
    if not saved:
        return ["a different recipe, calibration data or model"]
    found = [f"recipe: {_recipe_change(saved.get('recipe', {}), current['recipe'])}"] \
        if saved.get("recipe") != current["recipe"] else []
    old, new = saved.get("calibration", {}), current["calibration"]
    if old != new:
        found.append(f"calibration: {_windows(old)} windows there, {_windows(new)} here"
                     if old.get("windows") != new["windows"] else
                     "calibration: other tokens in as many windows (another seed or data)")
    old, new = saved.get("processes", 1), current.get("processes", 1)
    if old != new:
        found.append(f"processes: {old} there, {new} here")
    old, new = saved.get("model", {}), current["model"]
    if old != new:
        found.append(f"model: {'/'.join(old.get('dtypes', ['?']))} weights there, {'/'.join(new['dtypes'])} here"
                     if old.get("dtypes") != new["dtypes"] else "model: other weights (another model or checkpoint)")
    return found or ["a different recipe, calibration data or model"]


def _recipe_change(old, new):
    """The settings that differ; another method only by name (its settings differ as a matter of course)."""
    keys = ["method"] if old.get("method") != new.get("method") else sorted(old.keys() | new.keys())
    return "; ".join(f"{key} {old.get(key)} there, {new.get(key)} here" for key in keys
                     if old.get(key) != new.get(key))


def _windows(calibration):
    return "x".join(map(str, calibration.get("windows", ["?"])))


SUM_CHUNK = 1 << 22  # elements: a 32 MiB float64 slice


def _sums(t):
    """(sum, sum of |t|) in float64, a slice at a time: float64 copies of a whole embedding matrix (8 GiB
    for Llama-3-8B's, with its absolute values) would set a run's peak memory."""
    total = absolute = 0.0
    for part in t.detach().reshape(-1).split(SUM_CHUNK):
        part = part.double()
        total += float(part.sum())
        absolute += float(part.abs().sum())
    return total, absolute
