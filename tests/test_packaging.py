"""The install path the GPU machine uses (`pip install --no-deps --no-build-isolation -e .`, no internet).

Before pyproject.toml, pip fell back to `setup.py develop`, which recent setuptools turn into a nested pip
call *with* build isolation: it tried to download setuptools and failed offline. With the build-system
table, pip calls the PEP 660 hook directly; this test calls that hook, offline, the way pip does.
"""
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_build_goes_through_pep_517():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"


def test_editable_wheel_builds_offline_with_the_installed_setuptools(tmp_path):
    hook = ("import sys, setuptools.build_meta as b; "
            "print(b.build_editable(sys.argv[1]))")
    env = {**os.environ, "SDSENGINE_BUILD_CUDA": "0", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    done = subprocess.run([sys.executable, "-c", hook, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / done.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".pth") for n in names), names  # the editable hook that maps sdsengine(.kernels)
