"""What a non-editable install ships: an editable install reads the source tree, so a package left out of the build
(jitkernels.integrations was, until 2026-11-27) passes every other test and fails for users."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_build_ships_every_package_and_its_data(tmp_path):
    # from a copy without the egg-info an editable install leaves: its SOURCES.txt lists every file, and setuptools
    # ships what it lists as package data, which hid the missing package here (not in a fresh clone)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("*.egg-info", "build", ".git", "*.so", "__pycache__",
                                                             ".numba_cache", "results", ".hypothesis"))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(out)], cwd=src,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for top in ("jitkernels", "scheduler"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, ROOT)
                assert os.path.isfile(out / rel / "__init__.py"), f"package {rel} is not built"
                for f in files:
                    if f.endswith(".py"):
                        assert os.path.isfile(out / rel / f), f"{rel}/{f} is not built"
    for mix in ("mixed", "cross_silo", "cross_device"):
        assert os.path.isfile(out / "scheduler" / "workloads" / f"{mix}.toml")
    assert os.path.isfile(out / "jitkernels" / "_csrc" / "cuda" / "kernels.cu")
