"""The figures and recipes the docs state, checked against the code they describe.

* golden file sizes stated in README.md, docs/ and refghost's docstrings, against
  :func:`refghost.verify.golden.golden_file_size` on the shipped weights;
* versions of the test environment's packages named in README.md and docs/, against pyproject's
  ``test`` extra (the one place they live): a bump there flags every sentence to re-check;
* docs/testing.md's underflow counts and hard-sigmoid bound, against :mod:`refghost.bounds`;
* docs/porting.md's ncnn recipe, run as written (on a small GhostNet at 64x64 instead of 320x320).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from refghost import bounds
from refghost.cli import DEFAULT_WEIGHTS, main
from refghost.verify.golden import golden_file_size
from refghost.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9}


def _texts() -> list[tuple[str, str]]:
    """``(file, text)`` of README.md, docs/*.md and refghost's sources, each on one line (so that a
    figure and what it is about are found across line breaks and comment markers)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "refghost").rglob("*.py"))]
    return [(str(f.relative_to(ROOT)), re.sub(r"\s*\n\s*(?:#:?\s*)?", " ", f.read_text())) for f in files]


def _rounds_to(stated: str, actual: float) -> bool:
    """Whether ``stated`` is ``actual`` rounded at its last nonzero digit (340 at the tens, 2.65 at
    the hundredths, 25 at the units)."""
    if "." in stated:
        unit = 10.0 ** -len(stated.split(".")[1])
    else:
        unit = 10.0 ** (len(stated) - len(stated.rstrip("0")))
    return abs(float(stated) - actual) <= unit / 2


# ------------------------------------------------------------------------------------------------
# Golden file sizes
# ------------------------------------------------------------------------------------------------
def test_golden_sizes_stated_anywhere_are_golden_file_size():
    weights = load_weights(str(DEFAULT_WEIGHTS))
    w, h = weights.preprocessing.input_size
    number = r"(\d+(?:\.\d+)?) (KB|MB|GB)"
    claims = [  # (pattern, the size it states in bytes, from the pattern's match)
        (number + r" (?:per|at) (?:1x3x)?(\d+)x(\d+)\b",
         lambda m: golden_file_size(weights, (1, 3, int(m[3]), int(m[4])), True)),
        (number + r" for `--seed 0 --batch (\d+)`", lambda m: golden_file_size(weights, (int(m[3]), 3, h, w), True)),
        (number + r" without intermediates", lambda m: golden_file_size(weights, (1, 3, h, w), False)),
        (number + r" of it the weights", lambda m: sum(a.nbytes for a in weights.tensors.values())),
        (number + r" per input pixel", lambda m: golden_file_size(weights, (1, 3, h, w), True) / (h * w)),
    ]
    found, wrong = [], []
    for name, text in _texts():
        for pattern, size in claims:
            for m in re.finditer(pattern, text):
                actual = size(m) / UNITS[m[2]]
                found.append(name)
                if not _rounds_to(m[1], actual):
                    wrong.append(f"{name}: '{m[0]}', golden_file_size says {actual:.4g} {m[2]}")
    assert not wrong, "\n".join(wrong)
    # the statements this test was written for are still found (the patterns did not go stale)
    assert {"README.md", "docs/golden-format.md", "refghost/weights.py"} <= set(found), found


# ------------------------------------------------------------------------------------------------
# Versions
# ------------------------------------------------------------------------------------------------
#: How the docs name the pinned packages (OpenCV and protobuf are left out: the docs compare
#: several of their versions on purpose).
PACKAGE_NAMES = {"PyTorch": "torch", "torch": "torch", "ONNX Runtime": "onnxruntime", "onnxruntime": "onnxruntime",
                 "OpenVINO": "openvino", "MNN": "mnn", "ncnn": "ncnn", "pnnx": "pnnx", "LiteRT": "ai-edge-litert",
                 "ai-edge-litert": "ai-edge-litert", "NumPy": "numpy", "numpy": "numpy", "Numba": "numba",
                 "numba": "numba", "h5py": "h5py", "onnx": "onnx", "Hypothesis": "hypothesis", "pytest": "pytest",
                 "matplotlib": "matplotlib", "Dask": "dask"}


def test_versions_named_in_the_docs_are_the_pinned_ones():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    pins = dict(requirement.split("==") for requirement in extra)
    names = "|".join(sorted(map(re.escape, PACKAGE_NAMES), key=len, reverse=True))
    found, wrong = [], []
    for name, text in _texts():
        if not name.endswith(".md"):
            continue
        for m in re.finditer(rf"(?<![\w.-])({names}) (\d+(?:\.\d+)+)", text):
            if text[:m.start()].endswith(("since ", "before ", "until ")):
                continue  # a point in a package's history ("the default since PyTorch 2.9"), not a pin
            package, stated = PACKAGE_NAMES[m[1]], m[2]
            found.append(package)
            if pins[package].split(".")[:len(stated.split("."))] != stated.split("."):
                wrong.append(f"{name}: '{m[0]}', pyproject's test extra pins {package}=={pins[package]}")
    assert not wrong, "\n".join(wrong)
    assert found  # (the pattern still finds the docs' versions)


# ------------------------------------------------------------------------------------------------
# docs/testing.md's bounds
# ------------------------------------------------------------------------------------------------
def test_testing_md_states_the_bounds_the_code_computes():
    text = " ".join((ROOT / "docs" / "testing.md").read_text().split())

    def roundings(op, **params):
        return bounds._roundings(SimpleNamespace(op=op), params)

    n = 9  # a 3x3 kernel on one input channel
    conv = roundings("conv", weight=np.zeros((1, 1, 3, 3)))
    assert conv == 2 * n + 2 and roundings("conv", weight=np.zeros((1, 1, 3, 3)), bias=np.zeros(1)) == 2 * (n + 1) + 2
    assert roundings("linear", weight=np.zeros((1, n - 1))) == 2 * n + 2  # (a missing bias counts as a zero one)
    assert roundings("add") == roundings("scale")
    eta = 2.0 ** -150  # float32: half the smallest subnormal
    for phrase in ("conv/linear `2n + 2`", f"batch norm {roundings('batch_norm')},",
                   f"an activation {roundings('act')} ", f"hard-sigmoid {roundings('hard_sigmoid')},",
                   f"pooling {roundings('global_avg_pool')} ", f"add and scale {roundings('add')},",
                   f"concat {roundings('concat')};", f"plus {roundings('batch_norm')}η",
                   f"within `{conv}η = {conv * eta:.1e}`",
                   f"`u({bounds.HARD_SIGMOID_SLOPE_ROUNDINGS}(|x|+3)/6 + |y|)`"):
        assert phrase in text, phrase


# ------------------------------------------------------------------------------------------------
# docs/porting.md's ncnn recipe
# ------------------------------------------------------------------------------------------------
def _fenced(markdown: str, section: str | None) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the ``## section`` of ``markdown`` (None: of
    the text before the first section)."""
    body = markdown if section is None else markdown.split(f"\n## {section}\n", 1)[1]
    body = body.split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", body, flags=re.S)


def _at_64(code: str) -> str:
    """The recipe's 320x320 input as 64x64 (a small model converts and runs in seconds)."""
    return code.replace("1, 3, 320, 320", "1, 3, 64, 64").replace("[1,3,320,320]", "[1,3,64,64]")


def _run_commands(block: str, folder: Path) -> list[str]:
    """Run each line of a shell block (``pnnx ...``, ``refghost ...``) in ``folder``; returns them."""
    from test_runtime_ncnn import pnnx_executable

    done = []
    for line in block.splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        if argv[0] == "pnnx":
            proc = subprocess.run([pnnx_executable(), *argv[1:]], cwd=folder, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        else:
            assert argv[0] == "refghost", line
            assert main(argv[1:]) == 0, line  # an honest port passes, as deployed and --precise
        done.append(argv[0] + " " + argv[1])
    return done


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """docs/porting.md, a small GhostNet (width 0.5, seed 0) and its golden at 64x64 (``golden.h5``
    in the folder the recipe runs in)."""
    import torch_ghostnet as tg

    from refghost import Config
    from refghost.verify.golden import make_golden, write_golden
    from refghost.weights import from_tensors

    folder = tmp_path_factory.mktemp("recipe")
    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU", (4, 6, 9)), 0)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="nanodet", width=0.5, activation="ReLU"))
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    write_golden(folder / "golden.h5", make_golden(weights, x, intermediates=True))
    return SimpleNamespace(doc=(ROOT / "docs" / "porting.md").read_text(), model=model, folder=folder)


def _ncnn_blocks(doc: str) -> tuple[str, str]:
    """The ncnn section's Python block (the trace) and its commands (pnnx, then refghost)."""
    blocks = _fenced(doc, "ncnn (pnnx)")
    [trace] = [code for lang, code in blocks if lang == "python"]
    [commands] = [code for lang, code in blocks if lang == "" and code.startswith("pnnx ")]
    return trace, commands


def test_porting_ncnn_recipe_runs_as_written(recipe, monkeypatch):
    trace, commands = _ncnn_blocks(recipe.doc)
    monkeypatch.chdir(recipe.folder)
    exec(_at_64(trace), {"model": recipe.model})
    assert _run_commands(_at_64(commands), recipe.folder) == ["pnnx model.pt", "refghost compare", "refghost compare"]


@pytest.mark.slow  # the same pnnx and refghost path as above, from another input format
def test_porting_ncnn_recipe_from_onnx(recipe, monkeypatch):
    """"pnnx model.onnx ... works the same on an ONNX file of the TorchScript exporter (above)"."""
    _, commands = _ncnn_blocks(recipe.doc)
    [export] = [code for lang, code in _fenced(recipe.doc, None) if lang == "python"]
    folder = recipe.folder / "onnx"
    folder.mkdir()
    monkeypatch.chdir(folder)
    exec(_at_64(export), {"model": recipe.model})
    pnnx, precise = _at_64(commands).splitlines()[:2]
    assert _run_commands(f"{pnnx.replace('model.pt', 'model.onnx')}\n{precise.replace('golden.h5', '../golden.h5')}",
                         folder) == ["pnnx model.onnx", "refghost compare"]
