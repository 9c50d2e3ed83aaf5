"""Saving a pruned model as a normal Hugging Face checkpoint, atomically and without clobbering.

Every output directory (this checkpoint, convert's compressed one) is written through staged_directory:
into a temporary directory, put in place only when complete, so a failed run leaves no half-written
directory and a non-empty one is replaced only with overwrite, and only when it holds a checkpoint. Two runs
saving to one place (locks.py): each holds a lock on its staging directory while it writes, and puts it in
place under a lock for the output after checking again, so that neither replaces what the other saved
meanwhile unless told to overwrite; one refused keeps its result beside, as OUT.unsaved-XXXX.
"""
import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

from safetensors import SafetensorError

from sdsengine import locks, mixture_save
from sdsengine.files import fresh, unwritable, within

REPORT_NAME = "sdsengine.json"
# a directory holding one is a checkpoint overwrite may replace (the last: convert's manifest, nn/convert.py)
CHECKPOINT_MARKS = ("config.json", REPORT_NAME, "sdsengine_compressed.json")


def check_output_dir(out, overwrite=False) -> Path:
    """Call before any work: refuse a non-empty directory that holds no checkpoint (overwrite replaces the
    whole directory), one that does unless overwrite is set, and a place the files could not be written to."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    blocked = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocked is not None:
        raise FileExistsError(f"output path {out} lies under {blocked}, which is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        _refuse_replacing(out)
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass --overwrite (overwrite=True in Python) "
                                  "to replace it")
    if blocked := unwritable(_staging_parent(out)):
        raise PermissionError(f"cannot write {out}: {blocked} is not writable")
    _name_stopped_saves(out)
    return out


def _name_stopped_saves(out):
    """Warn of staging folders beside out that no live process holds: a save killed (SIGKILL, the OOM killer)
    before it put its result in place leaves a whole hidden copy of a model there, which nothing else names.
    Named, not deleted: a save that has just made its folder holds no lock on it yet for an instant."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # no parent yet, or one that may be written but not listed: nothing to name
        return
    stopped = [e for e in entries
               if e.name.startswith(_staging_prefix(out)) and e.is_dir() and locks.in_use(e) is False]
    if stopped:
        warnings.warn(f"{', '.join(str(e) for e in sorted(stopped))}: left beside {out} by a save that was stopped "
                      "before it finished (no run holds it); delete it to free the space")


def _refuse_replacing(out):
    """A non-empty out that overwrite could not replace (it deletes out whole): only an earlier checkpoint may
    go, never a folder of the user's own files."""
    here, home = Path.cwd().resolve(), _home()
    if within(here, out) or out == home:
        what = "your home" if out == home else "the current directory or holds it"
        raise FileExistsError(f"output directory {out} is {what}, which --overwrite would delete whole: name the "
                              "checkpoint's own directory")
    entries = list(out.iterdir())
    staged = [e for e in entries if e.name.startswith(_staging_prefix(out))]
    if len(staged) == len(entries):  # staged inside the empty out (a mount point): by a run saving now, or killed
        live = [locks.in_use(e) for e in staged]
        if any(live):
            raise FileExistsError(f"output directory {out} is being written by another sdsengine run right now: "
                                  "wait for it to finish, or name another directory")
        maybe = " (this file system cannot tell whether a run still writes it: check first)" if None in live else ""
        raise FileExistsError(f"output directory {out} holds only {', '.join(e.name for e in staged)}, left by a "
                              f"save that was stopped{maybe}: delete it and run again")
    if not any((out / mark).is_file() for mark in CHECKPOINT_MARKS):
        raise FileExistsError(f"output directory {out} is not empty and holds no model checkpoint (no "
                              f"{' or '.join(CHECKPOINT_MARKS)}) for --overwrite to replace: name a new or empty "
                              "directory")


def _home():
    try:
        return Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry (a container's arbitrary user): no home to protect
        return None


def _staging_prefix(out):
    """The name a save's staging folder for out starts with (the rest is random)."""
    return f".{out.name}.tmp-"


def _staging_parent(out):
    """Where the temporary directory goes: inside an empty out (which may be a mount point, which cannot be
    renamed or removed), else beside it, so that the final rename stays on one file system."""
    return out if out.is_dir() and not any(out.iterdir()) else out.parent


@contextlib.contextmanager
def staged_directory(out, overwrite=False):
    """Yields a temporary directory to fill; on success its files become `out` (new, empty, or with
    overwrite replaced whole), on failure it is removed and `out` is as it was."""
    out = check_output_dir(out, overwrite)
    parent = _staging_parent(out)
    parent.mkdir(parents=True, exist_ok=True)
    # made as any new folder is (the umask applied), not tempfile's 0700, which would become the output's mode
    tmp, _ = fresh(parent, _staging_prefix(out), "", os.mkdir)
    old = None
    try:
        with locks.using(tmp):  # another run's check sees a save in progress, not a killed one's leftovers
            yield tmp
            with locks.exclusive(out.parent, out.name):  # one run at a time checks and puts its result in place
                _refuse_taken(out, tmp, overwrite, staged_inside=parent == out)
                if parent == out:
                    _move_contents(tmp, out)
                else:
                    old = _swap_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)) and not isinstance(exc, OutputTaken):  # a failing disk
            raise OSError(f"could not write {out} ({exc}); nothing was written and {out} is as it was") from exc
        raise
    if old is not None:  # after the lock: removing a large checkpoint must not hold up other saves
        _remove_replaced(old, out)


class OutputTaken(FileExistsError):
    """Another run saved to the output while this one worked."""


def _refuse_taken(out, tmp, overwrite, staged_inside):
    """Under the parent's lock, just before this run's result goes in place: out must still be as it was
    checked at the start, unless overwrite lets it be replaced whole, and then only where it holds a
    checkpoint. Refused, this run's finished result is kept under a name of its own, not deleted."""
    # another run's staging folder, still in progress: the first to finish saves
    others = [e for e in out.iterdir() if not e.name.startswith(_staging_prefix(out))] if out.is_dir() else []
    if not others:
        return
    if overwrite and not staged_inside:
        _refuse_replacing(out)
        return
    kept = tmp.rename(tmp.with_name(f"{out.name}.unsaved-{tmp.name[-8:]}"))
    remedy = ("an output this run staged inside cannot be replaced" if overwrite else
              "pass --overwrite to replace it")
    raise OutputTaken(f"{out} was filled by another run while this one worked, so this run's result is not "
                      f"saved there ({remedy}): it is kept in {kept}; move it where you want it")


def save_checkpoint(model, tokenizer, out, report, overwrite=False) -> Path:
    """Save a pruned `model` (and `tokenizer`, unless None) as a Hugging Face checkpoint in `out`, with the run's
    `report` (PruneResult.report) beside it, as `sdsengine prune` saves it: staged and put in place whole, a non-empty
    `out` refused unless `overwrite` and it holds a checkpoint; a loaded mixture's experts written from views of their
    banks (mixture_save.py), where save_pretrained would copy them. Returns the output's path."""
    out = check_output_dir(out, overwrite)
    with staged_directory(out, overwrite) as tmp:
        entries = mixture_save.checkpoint_entries(model)
        if entries is None:
            model.save_pretrained(tmp, safe_serialization=True)
            _save_with_model(tokenizer, tmp, report)
        else:  # a mixture's experts written from views of its banks, where save_pretrained copies them
            mixture_save.write_shards(tmp, entries)
            save_beside_weights(model, tokenizer, tmp, report)
    return out


def save_beside_weights(model, tokenizer, directory, report):
    """What save_checkpoint writes besides the weights, into a directory that already holds them (written by a stream,
    pipeline/streaming.py): the config as save_pretrained writes it (the model's dtype and class in it), the generation
    config, the tokenizer and the report."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    _save_with_model(tokenizer, directory, report)


def _save_with_model(tokenizer, directory, report):
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / REPORT_NAME).write_text(json.dumps(report, indent=2))


def _move_contents(tmp, out):
    """Fill the empty out with tmp's entries; if one cannot move, those moved go back, leaving out empty."""
    moved = []
    try:
        for entry in list(tmp.iterdir()):
            entry.rename(out / entry.name)
            moved.append(out / entry.name)
    except BaseException:
        for path in moved:
            path.rename(tmp / path.name)
        raise
    tmp.rmdir()


def _swap_into_place(tmp, out):
    """Rename tmp to out; an old out is moved aside first (returned, for removal once the rename succeeded)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    return old


def _remove_replaced(old, out):
    try:
        shutil.rmtree(old, ignore_errors=True)
    finally:  # a failed or interrupted removal leaves a hidden copy: say where
        if old.exists():
            warnings.warn(f"{out} was replaced, but its earlier contents at {old} could not all be removed: "
                          "delete that folder")
