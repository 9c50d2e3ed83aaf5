"""The install path the GPU machine uses (`pip install --no-deps --no-build-isolation -e .`, no internet).

Before pyproject.toml, pip fell back to `setup.py develop`, which recent setuptools turn into a nested pip
call *with* build isolation: it tried to download setuptools and failed offline. With the build-system
table, pip calls the PEP 660 hook directly; this test calls that hook, offline, the way pip does.
"""
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from sdsengine.cuda_build import toolkit_problem

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
        assert done.returncode != 0 and "No module named 'kernels'" in done.stderr, done.stderr[-2000:]
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert not Path(done.stdout.strip()).is_relative_to(ROOT / "kernels"), done.stdout


def test_transformers_and_sdsengine_kernels_import_in_the_checkouts_root():
    code = ("from transformers import LlamaConfig, LlamaForCausalLM; import transformers.activations; "
            "import sdsengine.kernels as k; print(k.__name__, k.__file__)")
    done = _python_in_the_checkout(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["sdsengine.kernels", str(ROOT / "kernels" / "__init__.py")]


def _distribution(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
