"""Saving a pruned model as a normal Hugging Face checkpoint, atomically and without clobbering.

The checkpoint is written to a temporary sibling directory and renamed into place only when complete,
so a failed run leaves no half-written directory and a non-empty one is replaced only with overwrite.
"""
import json
import shutil
import tempfile
from pathlib import Path

REPORT_NAME = "sdsengine.json"


def check_output_dir(out, overwrite=False) -> Path:
    """Call before any work: refuse a non-empty directory unless overwrite is set."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    blocked = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocked is not None:
        raise FileExistsError(f"output path {out} lies under {blocked}, which is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite to replace it")
    return out


def save_checkpoint(model, tokenizer, out, report, overwrite=False) -> Path:
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp, out):
    """Rename tmp to out; an old out is moved aside first and deleted only after the rename succeeded."""
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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
