"""Numba's on-disk cache never serves code compiled from other sources (refghost.kernels._jit):
the cache folder is named by a digest of every source a kernel can depend on, every module that
declares a kernel is among them, the kernels are cached there, and old folders are pruned."""

import os
import re
import shutil
from pathlib import Path

import numba

import refghost
from refghost.kernels import _jit

PACKAGE = Path(refghost.__file__).resolve().parent


def _copy_sources(to: Path) -> Path:
    root = to / "refghost"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "data"))
    return root


def test_the_digest_changes_with_every_kernel_source_and_only_with_them(tmp_path):
    root = _copy_sources(tmp_path)
    before = _jit.sources_digest(root)
    assert before == _jit.sources_digest(PACKAGE)
    callee = root / "engine" / "squeeze_excite.py"  # run_program's callee, in another file
    callee.write_text(callee.read_text().replace("acc[k] + wrow[k] * vr", "acc[k] + wrow[k] * vr * 2"))
    assert _jit.sources_digest(root) != before
    callee.write_text((PACKAGE / "engine" / "squeeze_excite.py").read_text())
    constants = root / "threads.py"  # a constant kernels read
    constants.write_text(constants.read_text().replace("PARALLEL_MIN_WORK = 1 << 15", "PARALLEL_MIN_WORK = 1 << 14"))
    assert _jit.sources_digest(root) != before
    constants.write_text((PACKAGE / "threads.py").read_text())
    (root / "cli.py").write_text("# no kernel here\n")
    assert _jit.sources_digest(root) == before


def test_every_module_that_declares_a_kernel_is_digested():
    declares = re.compile(r"^from (\.|\.\.kernels\.)_jit import .*\b(jit|parallel_jit|vectorize)\b", re.M)
    modules = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
               if "__pycache__" not in p.parts and declares.search(p.read_text())]
    assert len(modules) >= 10
    for module in modules:
        assert module.parts[0] in _jit.KERNEL_SOURCES or module.as_posix() in _jit.KERNEL_SOURCES, module


def test_kernels_are_cached_in_the_folder_of_their_sources_and_other_code_keeps_its_own():
    from refghost.engine.run import run_program
    from refghost.kernels.depthwise import depthwise

    assert Path(_jit.CACHE_DIR).name == f"refghost-numba-{_jit.sources_digest()}"
    for kernel in (run_program, depthwise):
        assert kernel._cache._cache_path.startswith(_jit.CACHE_DIR), kernel._cache._cache_path
    assert numba.config.CACHE_DIR != _jit.CACHE_DIR  # restored after the declarations

    @numba.njit(cache=True)
    def elsewhere(x):
        return x + 1

    assert not elsewhere._cache._cache_path.startswith(_jit.CACHE_DIR)


def test_old_cache_folders_are_pruned_to_the_most_recently_used(tmp_path, monkeypatch):
    for i in range(6):
        old = tmp_path / f"refghost-numba-{i:016x}"
        old.mkdir()
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "someone-else").mkdir()
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    current = Path(_jit._cache_dir())
    assert current.parent == tmp_path and current.is_dir()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([current.name, "someone-else"] + [f"refghost-numba-{i:016x}" for i in (3, 4, 5)])
