"""This folder imported under the top-level name `kernels`, which belongs to Hugging Face's kernel package.

sdsengine installs this folder as `sdsengine.kernels` only. But where the checkout's root is on sys.path
(`python -m ...` or `python -c ...`, a REPL or pytest started there), `import kernels` finds this folder before
the installed package, and transformers imports that package by name (transformers 5.25 requires it) and
fails on names we do not have. Imported under that name, this package hands the name over to the installed
one, so that the checkout's root is as safe a working directory as any.

Where none is installed (transformers before 5.25 does not require it), the name is given to a stand-in that
transformers reads as "not installed". Raising ImportError instead would break transformers itself: before 5.25
its probe finds this folder (`find_spec`, which runs no code), then imports it unguarded, so every transformers
model would fail to import. A folder named `kernels` found further along sys.path (tests/kernels, where pytest
put tests/ there) is no package either, and gets the same stand-in.
"""
import importlib
import importlib.machinery
import os
import sys
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NotInstalled(types.ModuleType):
    """What `import kernels` gives where no package of that name is installed: every attribute is missing,
    naming why. transformers' probe reads `__version__` and `__file__` with defaults and so finds no package.
    Having no `__file__` at all also keeps inspect.getmodule, which remembers the file of each name it has
    seen (this folder's, while it ran under that name), from failing on a module whose file is None. It has a
    spec, without which importlib.util.find_spec of the name raises ValueError (transformers probes again)."""

    def __init__(self, name):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(self, attr):
        raise AttributeError(f"no package {self.__name__!r} is installed (sdsengine's folder of that name is "
                             f"sdsengine.kernels; Hugging Face's is `pip install {self.__name__}`)")


def hand_over(name):
    """Put the installed package `name` in sys.modules in place of this folder (the import statement that
    is running returns what sys.modules holds once the module has run), or a NotInstalled stand-in where
    there is none: nothing, or a folder without an __init__.py (a namespace package)."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]  # this folder's modules, loaded under the wrong name
    path = sys.path[:]
    sys.path[:] = [entry for entry in path if os.path.abspath(entry or os.curdir) != _ROOT]
    try:
        installed = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # the installed package is there but lacks one of its own dependencies
            raise
        installed = None
    finally:
        sys.path[:] = path
    if getattr(installed, "__file__", None) is None:
        sys.modules[name] = NotInstalled(name)
