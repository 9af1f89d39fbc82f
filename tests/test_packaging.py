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


def test_the_sdist_builds_and_ships_the_cuda_source(tmp_path):
    """setuptools puts only the extension's sources and depends in an sdist: without MANIFEST.in the CUDA source and
    jk_noise.h were missing, and building from the sdist (pip install of it, python -m build) failed."""
    import tarfile

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("*.egg-info", "build", ".git", "*.so", "__pycache__",
                                                             ".numba_cache", "results", ".hypothesis"))
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").iterdir()
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (tree,) = (tmp_path / "unpacked").iterdir()
    assert not list(tree.rglob("*.so"))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(out)], cwd=tree,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for rel in ("jk_math.h", "jk_noise.h", "jk_secagg.h", "cuda/kernels.cu", "cuda/emulate.h"):
        assert os.path.isfile(out / "jitkernels" / "_csrc" / rel), rel
    for header in ("kernels.h", "jk_robust_coord.h"):  # (the extension's build reads them)
        assert os.path.isfile(tree / "csrc" / header)


def test_the_openmp_probe_takes_a_compiler_with_arguments(tmp_path):
    """CXX="ccache g++" was run as one executable name: FileNotFoundError while setup.py was imported."""
    env = {**os.environ, "CXX": "env g++"}  # (a command with an argument, like ccache g++)
    run = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['setup.py', '--name']; "
                          "runpy.run_path('setup.py', run_name='__main__')"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "jitkernels", run.stderr[-2000:]
    env["CXX"] = "no-such-compiler-here"
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "OpenMP not available" in run.stderr, run.stderr[-2000:]
