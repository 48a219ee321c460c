"""refghost.verify.judge: one candidate judged on one golden, one record; the CLI and a set's task agree with it.

Real runtimes on one small GhostNet (width 0.5, 64x64) converted by tests/runtime_bank.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import runtime_bank as rb
import torch_ghostnet as tg
from refghost import Config
from refghost.verify.golden import make_golden, write_golden
from refghost.verify.judge import Candidate, Judgement, choose_policy, judge
from refghost.weights import from_tensors


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    folder = tmp_path_factory.mktemp("candidates")
    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU", (4, 6, 9)), 1)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="nanodet", width=0.5))
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    golden = make_golden(weights, x, intermediates=True)
    write_golden(folder / "golden.h5", golden)
    return golden, rb.build_port(weights, 64, folder / "port", runtimes=("ncnn",)), folder


def test_a_model_file_gives_one_record(port):
    golden, files, _ = port
    path = str(files.files["ncnn_fp16"])
    judgement = judge(Candidate(path), golden)
    assert isinstance(judgement, Judgement) and judgement.passed
    # pnnx's default .bin stores weights in float16: the policy the runtime reports, and why
    assert judgement.policy == judgement.report.policy == "float16-weights"
    assert judgement.policy_reason.startswith("the precision the runtime reports (ncnn: ")
    assert judgement.run.runtime == "ncnn" and judgement.run.model == path
    assert judgement.candidate.startswith(path) and judgement.report.candidate == judgement.candidate
    assert judgement.report.runtime["policy"] == "float16-weights"
    assert any("--precise cannot undo" in n and "fp16=0" in n for n in judgement.report.notes), judgement.report.notes
    assert set(judgement.seconds) == {"candidate", "compare"} and all(s > 0 for s in judgement.seconds.values())
    assert set(judgement.tensors) == set(judgement.run.tensors)
    # the report: the file in the header, the mapping as counts (every match under --verbose)
    from refghost.verify.compare import format_report

    short, verbose = format_report(judgement.report).splitlines(), format_report(judgement.report, verbose=True)
    assert short[1] == f"candidate {judgement.candidate}"
    mapping = next(line for line in short if line.startswith("mapping "))
    assert mapping.startswith(f"mapping   {len(judgement.run.mapping)} of {judgement.run.exposed} exposed tensors "
                              f"mapped to layers ({len(judgement.run.mapping)} by structure)") and len(mapping) < 200
    assert all(f"  {blob} " in verbose for blob in judgement.run.mapping)


def test_arrays_are_judged_as_float32_and_a_policy_as_asked(port, tmp_path):
    golden, files, _ = port
    run = judge(Candidate(str(files.files["ncnn_fp32"]), precise=True), golden)
    assert run.policy == "float32" and run.run.precision.is_float32
    dump = tmp_path / "dump.npz"
    np.savez(dump, **run.tensors)
    arrays = judge(Candidate(str(dump)), golden)
    assert arrays.run is None and arrays.policy == "float32" and "arrays from a file" in arrays.policy_reason
    assert arrays.passed and run.passed
    asked = judge(Candidate(str(files.files["ncnn_fp32"]), precise=True, policy="float16-storage"), golden)
    assert asked.policy == "float16-storage" and asked.policy_reason == "--policy as asked"
    assert any("reports float32 precision" in n and "as asked" in n for n in asked.report.notes)


def test_choose_policy_without_a_run():
    assert choose_policy("auto")[0] == "float32"
    assert choose_policy("bfloat16")[:2] == ("bfloat16", "--policy as asked")


def test_the_cli_and_a_set_task_give_the_judgement(port, tmp_path):
    from refghost.cli import main
    from refghost.verify.dataset import Job, run_task

    golden, files, folder = port
    path = str(files.files["ncnn_fp16"])
    judgement = judge(Candidate(path), golden)
    assert main(["compare", str(folder / "golden.h5"), path, "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["policy"] == judgement.policy and report["passed"] == judgement.passed
    assert [t["name"] for t in report["tensors"]] == [t.name for t in judgement.report.tensors]
    task = run_task(Job(candidate=Candidate(path)), str(folder / "golden.h5"))
    assert task.status == "pass" and set(task.seconds) >= {"oracle", "candidate", "compare"}
    assert [(name, acc) for name, _, acc, _ in task.layers] == [(t.name, t.accumulated_ratio)
                                                              for t in judgement.report.tensors]


def test_an_openvino_ir_with_f16_weights_is_told_how_to_resave_it(port, tmp_path):
    import openvino as ov

    golden, files, _ = port
    ov.save_model(ov.Core().read_model(str(files.files["onnx"])), str(tmp_path / "f16.xml"), compress_to_fp16=True)
    judgement = judge(Candidate(str(tmp_path / "f16.xml"), precise=True), golden)
    assert judgement.policy == "float16-weights" and judgement.passed
    note = next(n for n in judgement.report.notes if n.startswith("the runtime did not run in float32"))
    assert "(OpenVINO: " in note and "pnnx" not in note and "ncnn" not in note
    assert "--precise cannot undo" in note and "compress_to_fp16=False" in note


def test_a_precision_speaks_the_policies_vocabulary():
    """A runtime's Precision is judged by the one table of policies (refghost.bounds.POLICIES)."""
    from refghost.bounds import POLICIES
    from refghost.runtimes import Precision

    for policy in POLICIES.values():  # each policy's own three formats give that policy back
        assert Precision(policy.arithmetic, policy.weights, policy.activations).policy == policy.name
    assert Precision(weights="bfloat16").policy == "bfloat16-storage"  # covered by the looser storage policy
    with pytest.raises(ValueError, match="Precision.weights must be one of"):
        Precision(weights="fp16")
