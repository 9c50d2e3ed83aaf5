"""The install path the GPU machine uses (`pip install --no-deps --no-build-isolation -e .`, no internet).

Before pyproject.toml, pip fell back to `setup.py develop`, which recent setuptools turn into a nested pip
call *with* build isolation: it tried to download setuptools and failed offline. With the build-system
table, pip calls the PEP 660 hook directly; this test calls that hook, offline, the way pip does.
"""
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tomllib
import types
import zipfile
from pathlib import Path

import pytest

from sdsengine.cuda_build import toolkit_problem
from sdsengine.kernels._shadow import NotInstalled, hand_over

ROOT = Path(__file__).resolve().parent.parent


def test_build_goes_through_pep_517():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"


def _build(hook, out_dir):
    """Names in the wheel that setuptools' PEP 517 `hook` (build_wheel, build_editable) writes, offline, from a
    copy of the sources: in the checkout, setuptools would add whatever an earlier build left in build/lib."""
    source = out_dir / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("sdsengine", "kernels", "csrc"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    env = {**os.environ, "SDSENGINE_BUILD_CUDA": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=source, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return zipfile.ZipFile(out_dir / done.stdout.strip().splitlines()[-1]).namelist()


def test_editable_wheel_builds_offline_with_the_installed_setuptools(tmp_path):
    names = _build("build_editable", tmp_path)
    assert any(n.endswith(".pth") for n in names), names  # the editable hook that maps sdsengine(.kernels)


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    return _build("build_wheel", tmp_path_factory.mktemp("wheel"))


def test_wheel_installs_kernels_only_inside_sdsengine(wheel_names):
    # kernels/ ships as sdsengine.kernels; a top-level `kernels` would shadow Hugging Face's package
    assert "sdsengine/kernels/__init__.py" in wheel_names
    sources = {Path(p).name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h")}
    assert sources <= {n.removeprefix("sdsengine/csrc/") for n in wheel_names}  # for a JIT build without the checkout
    stray = [n for n in wheel_names if not n.startswith(("sdsengine/", "sdsengine-"))]
    assert not stray, stray


def test_the_wheel_ships_every_module(wheel_names):
    """setup.py names its packages one by one: a subpackage left off that list would be missing from the wheel
    while every test of the checkout passes."""
    shipped_as = {ROOT / "sdsengine": "sdsengine", ROOT / "kernels": "sdsengine/kernels"}  # setup.py's package_dir
    modules = {f"{prefix}/{p.relative_to(folder).as_posix()}" for folder, prefix in shipped_as.items()
               for p in folder.rglob("*.py")}
    assert "sdsengine/pipeline/sequential.py" in modules
    missing = sorted(modules - set(wheel_names))
    assert not missing, missing


def _fake_toolkit(root, release):
    """root/bin/nvcc: a script that reports this CUDA release, as `nvcc --version` does."""
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)


@pytest.mark.parametrize("release, problem", [("11.8", "older than 12.0"), ("12.4", None), ("13.0", None)])
def test_the_cuda_toolkit_version_gates_the_extension(tmp_path, release, problem):
    """The Hopper sources need CUDA 12: setup.py and the JIT build name an older nvcc as the reason to go
    without the extension, instead of failing the install."""
    _fake_toolkit(tmp_path, release)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    found = toolkit_problem(str(tmp_path))
    assert found is None if problem is None else problem in found
    assert "cannot run" in toolkit_problem(str(tmp_path / "missing"))


def test_a_toolkit_without_its_headers_is_named(tmp_path, monkeypatch):
    """CUDA_HOME taken from an nvcc wrapper on PATH (/usr/local/bin/nvcc) has no include/cuda_runtime.h: named,
    instead of a failed install; headers where the compilers will find them some other way are accepted."""
    _fake_toolkit(tmp_path, "13.0")
    for var in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert "no cuda_runtime.h in" in toolkit_problem(str(tmp_path))
    headers = tmp_path / "cuda" / "include"
    headers.mkdir(parents=True)
    (headers / "cuda_runtime.h").write_text("")
    for var in ("CUDA_INC_PATH", "CPATH"):  # where torch's build, or gcc itself, is told to look
        monkeypatch.setenv(var, f"/nowhere{os.pathsep}{headers}")
        assert toolkit_problem(str(tmp_path)) is None
        monkeypatch.delenv(var)
    conda = tmp_path / "targets" / "x86_64-linux" / "include"  # conda's CUDA 12 packages put them here
    conda.mkdir(parents=True)
    (conda / "cuda_runtime.h").write_text("")
    assert toolkit_problem(str(tmp_path)) is None


def _python_in_the_checkout(code):
    """`python -c code` started in the checkout's root, which is then first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_checkouts_kernels_folder_does_not_hide_hugging_faces_package():
    # transformers >= 5.25 requires Hugging Face's `kernels` and imports it by name; started in the checkout's
    # root, `import kernels` found our folder first and every transformers model failed to import
    done = _python_in_the_checkout("import kernels; print(kernels.__file__)")
    if importlib.util.find_spec("kernels") is None or not _distribution("kernels"):
        assert done.returncode != 0 and "no package 'kernels' is installed" in done.stderr, done.stderr[-2000:]
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert not Path(done.stdout.strip()).is_relative_to(ROOT / "kernels"), done.stdout


def test_transformers_and_sdsengine_kernels_import_in_the_checkouts_root():
    code = ("from transformers import LlamaConfig, LlamaForCausalLM; import transformers.activations; "
            "import sdsengine.kernels as k; print(k.__name__, k.__file__)")
    done = _python_in_the_checkout(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["sdsengine.kernels", str(ROOT / "kernels" / "__init__.py")]


def _package_dirs(root, **packages):
    """Under root: for each name, a folder with an __init__.py (True) or without one (False, a namespace)."""
    for name, regular in packages.items():
        (root / name).mkdir()
        if regular:
            (root / name / "__init__.py").write_text("__version__ = '1.0'\n")
    return str(root)


@pytest.mark.parametrize("found", ["nothing", "a namespace folder", "a package"])
def test_the_name_goes_to_an_installed_package_or_to_a_stand_in(tmp_path, monkeypatch, found):
    """hand_over gives the name to the package installed under it; where there is none, or only a folder without
    an __init__.py (tests/kernels, where pytest puts tests/ on sys.path), to a stand-in that transformers' probe
    (getattr with defaults) reads as not installed and that inspect.getmodule passes over."""
    name = "sds_hand_over_probe"
    if found != "nothing":
        monkeypatch.syspath_prepend(_package_dirs(tmp_path, **{name: found == "a package"}))
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # as this folder, running under that name
    hand_over(name)
    module = sys.modules.pop(name)
    if found == "a package":
        assert module.__file__ == str(tmp_path / name / "__init__.py") and module.__version__ == "1.0"
        return
    assert isinstance(module, NotInstalled)
    assert getattr(module, "__version__", "N/A") == "N/A" and getattr(module, "__file__", None) is None
    assert not hasattr(module, "__file__")
    with pytest.raises(AttributeError, match=f"no package '{name}' is installed"):
        module.get_kernel
    sys.modules[name] = module  # as the import leaves it
    try:
        assert importlib.util.find_spec(name).name == name  # probed again: answered from sys.modules, by its spec
        assert inspect.getmodule(inspect.currentframe()) is sys.modules[__name__]  # a scan: a file of None failed it
    finally:
        del sys.modules[name]


_WITHOUT_KERNELS = """
import importlib.machinery, sys
class Hidden:  # Hugging Face's `kernels` as if not installed: only what lies outside site-packages is found
    def find_spec(self, name, path=None, target=None):
        if name == "kernels":
            spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if "packages" not in p])
            if spec is None:
                raise ModuleNotFoundError("No module named 'kernels'", name=name)
            return spec
sys.meta_path.insert(0, Hidden())
sys.path.append("tests")  # as pytest puts it: tests/kernels is then a namespace folder named `kernels`
"""


def test_the_checkouts_root_is_safe_where_no_kernels_package_is_installed():
    """transformers before 5.25 does not require Hugging Face's `kernels`; its probe finds our folder (find_spec)
    and imports it unguarded. With none installed, the probe must see no package, and nothing may be left that
    breaks inspect.getmodule, which torch calls as it registers custom ops (torch._dynamo, which transformers
    imports): a namespace module did, once torch's import had seen this folder's file under that name."""
    code = _WITHOUT_KERNELS + (
        "import kernels, inspect, json, torch._dynamo\n"  # this folder runs (and imports torch) first
        "print(getattr(kernels, '__version__', 'N/A'), getattr(kernels, '__file__', None))\n"
        "print(inspect.getmodule(json.dumps.__code__).__name__)\n"  # a scan of every module
        "import importlib.util; print(importlib.util.find_spec('kernels').origin)\n")  # probed again
    done = _python_in_the_checkout(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["N/A", "None", "json", "None"], done.stdout


def _distribution(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
