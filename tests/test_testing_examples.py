"""The Python code blocks of docs/testing.md run, and the property tests they define pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def _blocks():
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 3, "docs/testing.md lost its examples"
    return blocks


def _first_test_name(code):
    names = re.findall(r"^def (test_\w+)", code, flags=re.MULTILINE)
    return names[0] if names else "no_tests"


BLOCKS = _blocks()


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}-{_first_test_name(c)}" for i, c in enumerate(BLOCKS)])
def test_doc_block_runs_and_its_tests_pass(code):
    namespace = {"__name__": "docs_testing_md"}
    exec(compile(code, f"{DOC.name}:block", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert tests, "each example block defines at least one test"
    for test in tests:
        test()  # a Hypothesis @given test runs its examples under the active profile


def test_doc_example_catches_a_flipped_kernel():
    """The first example's claim: a backend with a flipped kernel fails, on a small case."""
    import torch
    import torch.nn.functional as F
    from hypothesis import given, settings

    from refghost.testing import assert_matches_reference
    from refghost.testing import strategies as rst

    def flipped(case):
        w = torch.from_numpy(case.w).flip(2, 3)
        b = None if case.b is None else torch.from_numpy(case.b)
        return F.conv2d(torch.from_numpy(case.x), w, b, stride=case.stride, padding=case.padding, groups=case.groups)

    @settings(database=None, derandomize=True, max_examples=100)
    @given(rst.conv_cases(depthwise=True, kernel_sizes=(3, 5)))
    def test_my_depthwise(case):
        assert_matches_reference("conv2d", case, flipped(case))

    with pytest.raises(AssertionError, match=r"outside the derived bound") as info:
        test_my_depthwise()
    message = str(info.value)  # the shrunk case: one image, one channel, a 3x3 kernel
    assert message.startswith("conv2d [x (1, 1, ") and "w (1, 1, 3, 3)" in message, message


# --- the README's snippet ------------------------------------------------------------------------
README = DOC.parent.parent / "README.md"

#: A correct depthwise/grouped convolution in float32 NumPy (the "backend" the README's snippet
#: calls ``my_backend_conv``), and one with its kernel flipped: the snippet must pass the first
#: and fail the second.
BACKENDS = '''
import numpy as np

def my_backend_conv(case, flip=False):
    x, w = case.x.astype(np.float32), case.w.astype(np.float32)
    if flip:
        w = w[:, :, ::-1, ::-1]
    n, _, h, wd = x.shape
    o, cg, k, _ = w.shape
    s, p, og = case.stride, case.padding, o // case.groups
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    y = np.zeros((n, o, oh, ow), np.float32)
    for g in range(case.groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(k):
            for j in range(k):
                patch = xs[:, :, i:i + s * oh:s, j:j + s * ow:s]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    if case.b is not None:
        y += case.b.astype(np.float32)[None, :, None, None]
    return y
'''


def _readme_snippet() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    snippets = [b for b in blocks if "refghost.testing" in b]
    assert len(snippets) == 1, "README.md's refghost.testing snippet is gone (or doubled)"
    return snippets[0]


def _run_snippet_fresh(backend_call: str):
    """The README snippet in a fresh Python (no test-suite profile: Hypothesis's own defaults,
    deadline included, derandomized only), against ``my_backend_conv`` bound to ``backend_call``."""
    import subprocess
    import sys

    snippet = _readme_snippet()
    code = "\n".join([
        "from hypothesis import settings",
        "settings.register_profile('readme', derandomize=True, database=None)",  # deadline left at its default
        "settings.load_profile('readme')",
        BACKENDS,
        f"_backend = my_backend_conv\nmy_backend_conv = lambda case: {backend_call}",
        snippet,
        "test_my_depthwise()",
        "print('snippet passed')",
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_readme_snippet_passes_a_correct_backend_in_a_fresh_process():
    done = _run_snippet_fresh("_backend(case)")
    assert done.returncode == 0 and "snippet passed" in done.stdout, done.stderr[-3000:]


def test_readme_snippet_fails_a_flipped_kernel():
    done = _run_snippet_fresh("_backend(case, flip=True)")
    assert done.returncode != 0
    assert "outside the derived bound" in done.stderr and "DeadlineExceeded" not in done.stderr, done.stderr[-3000:]
