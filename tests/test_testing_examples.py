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
