"""This folder imported under the top-level name `kernels`, which belongs to Hugging Face's kernel package.

sdsengine installs this folder as `sdsengine.kernels` only. But where the checkout's root is on sys.path
(`python -m ...` or `python -c ...`, a REPL or pytest started there), `import kernels` finds this folder before
the installed package, and transformers imports that package by name (transformers 5.25 requires it) and
fails on names we do not have. Imported under that name, this package hands the name over to the installed
one, so that the checkout's root is as safe a working directory as any.
"""
import importlib
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hand_over(name):
    """Put the installed package `name` in sys.modules in place of this folder (the import statement that
    is running returns what sys.modules holds once the module has run). Without one installed,
    `import kernels` fails as it would without this folder."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]  # this folder's modules, loaded under the wrong name
    path = sys.path[:]
    sys.path[:] = [entry for entry in path if os.path.abspath(entry or os.curdir) != _ROOT]
    try:
        importlib.import_module(name)
    finally:
        sys.path[:] = path
