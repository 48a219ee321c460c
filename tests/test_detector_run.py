"""A whole NanoDet detector end to end: its weights file, ``refghost.run`` from an image to the
detections (against the independent PyTorch NanoDet of tests/torch_nanodet.py and
tests/torch_nanodet_post.py), ``refghost run`` with --json/--draw, and ``refghost convert`` of a
NanoDet checkpoint with and without its YAML config."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch_nanodet as tn
import torch_nanodet_post as tp
from PIL import Image

import refghost
from refghost.cli import SAMPLE_IMAGE, main
from refghost.detector.decode import PRIOR_OFFSETS
from refghost.detector.run import DETECTION_KEYS, prepare_batch
from refghost.detector.spec import PRESETS
from refghost.errors import RefghostError, WeightsError
from refghost.weights import NANODET_PREPROCESSING, from_tensors, load_weights, save_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "weights" / "nanodet-plus-m_320.h5"
CONFIGS = Path(__file__).resolve().parent / "data" / "nanodet_configs"


#: How many (prior, class) scores of a test input pass NanoDet's 0.05 threshold after
#: :func:`few_candidates`: enough for NMS to suppress, few enough for the O(n^2) NMS loops.
CANDIDATES = 60


def few_candidates(model, config, x: np.ndarray) -> None:
    """Set the class biases of a randomized torch NanoDet so that :data:`CANDIDATES` scores of
    input ``x`` pass the 0.05 threshold (random init makes every class score about sigmoid(0);
    a trained head starts at NanoDet's -4.595 and learns to pass a handful)."""
    biases = [m.bias for name, m in model.named_modules() if name.startswith("head.gfl_cls.")]
    torch.set_num_threads(1)
    with torch.no_grad():
        for b in biases:
            b[:config.num_classes] = 0
        scores = model.double()(torch.from_numpy(x).double(), export=True)[..., :config.num_classes]
        logits = torch.logit(scores).flatten().sort(descending=True)[0]
        shift = float(np.log(0.05 / 0.95) - logits[CANDIDATES - 1]) + 1e-3
        for b in biases:
            b[:config.num_classes] = shift
    model.float()


def torch_weights(config, seed, preprocessing=NANODET_PREPROCESSING, class_names=(), x=None):
    """A randomized torch NanoDet (with :func:`few_candidates` on ``x`` if given) and the same
    weights as refghost Weights."""
    model = tn.randomize(tn.build(config), seed=seed)
    if x is not None:
        few_candidates(model, config, x)
    tensors = {k: v.numpy() for k, v in model.state_dict().items() if k in _graph_keys(config)}
    return model, from_tensors(tensors, config, preprocessing, class_names=class_names)


def _graph_keys(config):
    from refghost.detector.graph import build_detector_graph

    return build_detector_graph(config).param_shapes


# --- the weights file ---------------------------------------------------------------------


def test_detector_weights_file_round_trip(tmp_path):
    config = replace(PRESETS["nanodet-m"], num_classes=3)
    pre = replace(NANODET_PREPROCESSING, keep_ratio=True, input_size=(416, 416))
    _, w = torch_weights(config, 0, pre, class_names=("cat", "dog", "bird"))
    save_weights(tmp_path / "w.h5", w)
    back = load_weights(tmp_path / "w.h5")
    assert back.config == config and back.preprocessing == pre and back.class_names == ("cat", "dog", "bird")
    assert all(np.array_equal(back.tensors[k], w.tensors[k]) for k in w.tensors)
    with h5py.File(tmp_path / "w.h5") as f:
        assert f.attrs["arch"] == "detector" and "width" not in f.attrs
        assert json.loads(f.attrs["detector"])["neck"] == "pan"


@pytest.mark.parametrize("attr, value, message", [
    ("detector", "{not json", "not JSON"),
    ("detector", '{"backbone": "resnet"}', "backbone"),
    ("detector", '{"colour": 1}', "unknown field"),
    ("class_names", '["a", "b"]', "names 2 classes, the network has 80"),
    ("keep_ratio", 3, "keep_ratio"),
])
def test_bad_detector_attributes_are_refused(tmp_path, attr, value, message):
    save_weights(tmp_path / "w.h5", load_weights(SHIPPED))
    with h5py.File(tmp_path / "w.h5", "r+") as f:
        f.attrs[attr] = value
    with pytest.raises(WeightsError, match=message):
        load_weights(tmp_path / "w.h5")


# --- image to detections, against PyTorch ---------------------------------------------------


def torch_detections(model, config, batch):
    """The independent implementation's detections of a prepared batch, in float64: the export
    output, NanoDet's decode and multiclass NMS, boxes warped back with inv(M) and clipped."""
    x = torch.from_numpy(batch.x).double()
    torch.set_num_threads(1)  # again: refghost's kernels may have reset it (conftest.one_torch_thread)
    with torch.no_grad():
        output = model.double()(x, export=True)
    h, w = x.shape[2:]
    scores, boxes = tp.decode(output, config.num_classes, config.reg_max, config.strides,
                              PRIOR_OFFSETS[config.head], (h, w))
    result = []
    for n in range(x.shape[0]):
        kept_boxes, kept_scores, labels = tp.multiclass_nms(boxes[n], scores[n], 0.05, 0.6, 100)
        inverse = torch.from_numpy(np.linalg.inv(batch.matrices[n]))
        corners = kept_boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)
        xy = torch.cat([corners, torch.ones(len(corners), 1, dtype=corners.dtype)], 1) @ inverse.T
        xy = (xy[:, :2] / xy[:, 2:]).reshape(-1, 8)
        width, height = batch.original_sizes[n]
        warped = torch.stack([xy[:, 0::2].min(1)[0].clamp(0, width), xy[:, 1::2].min(1)[0].clamp(0, height),
                              xy[:, 0::2].max(1)[0].clamp(0, width), xy[:, 1::2].max(1)[0].clamp(0, height)], 1)
        result.append((warped.numpy(), kept_scores.numpy(), labels.numpy()))
    return output.numpy(), result


@pytest.mark.parametrize("preset, keep_ratio, size", [
    ("nanodet-plus-m_320", False, 320),
    ("nanodet-plus-m_320", True, 320),
    ("nanodet-plus-m_416", False, 416),
    ("nanodet-m", True, 320),
    ("ghostnet-ghostpan-plus", False, 320),
])
def test_image_to_detections_agrees_with_pytorch(preset, keep_ratio, size):
    """float64 both sides, the same prepared input: the export output within 1e-10 of its scale,
    every kept detection the same (label, order) with box and score equal to 1e-9 relative.
    (Both compute the same float64 functions in other summation orders; 1e-10 is ~10^6 ulps,
    far below any decision margin, and far above their rounding differences.)"""
    config = PRESETS[preset]
    pre = replace(NANODET_PREPROCESSING, keep_ratio=keep_ratio, input_size=(size, size))
    _, w = torch_weights(config, seed=3, preprocessing=pre)
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))[::-1, :, ::-1]  # BGR, upside down, 480x360
    batch = prepare_batch([np.ascontiguousarray(image), str(SAMPLE_IMAGE)], w, "float64")
    model, w = torch_weights(config, seed=3, preprocessing=pre, x=batch.x)
    fit = (size, size * 360 // 480)  # the 480x360 image fit into size x size, then padded to 32
    assert batch.x.shape == ((2, 3, -(-fit[1] // 32) * 32, size) if keep_ratio else (2, 3, size, size))
    ours = refghost.run(batch.x, w, dtype="float64")  # the float input: identity matrices
    expected_output, _ = torch_detections(model, config, batch)
    scale = np.abs(expected_output).max()
    assert np.abs(ours["output"] - expected_output).max() <= 1e-10 * scale
    from refghost.detector.run import postprocess

    mine = postprocess(ours["output"], config, batch)
    _, theirs = torch_detections(model, config, batch)
    for n, (boxes, scores, labels) in enumerate(theirs):
        row = mine["detections.image"] == n
        assert len(labels) > 0
        np.testing.assert_array_equal(mine["detections.labels"][row], labels)
        np.testing.assert_allclose(mine["detections.scores"][row], scores, rtol=1e-9)
        np.testing.assert_allclose(mine["detections.boxes"][row], boxes, rtol=1e-9, atol=1e-9 * 480)
        assert (boxes[:, 2] <= 480).all() and (boxes[:, 3] <= 360).all()


def test_run_on_an_image_file_equals_the_pipeline_by_hand():
    w = load_weights(SHIPPED)
    out = refghost.run(str(SAMPLE_IMAGE), w)
    batch = prepare_batch([str(SAMPLE_IMAGE)], w, "float32")
    by_hand = refghost.run(batch.x, w)
    np.testing.assert_array_equal(out["output"], by_hand["output"])
    assert list(out) == ["output", *DETECTION_KEYS]
    assert 1 <= len(out["detections.scores"]) <= 100 and (out["detections.scores"] > 0.05).all()
    assert (np.diff(out["detections.scores"]) <= 0).all()  # NanoDet's order: by score


def test_run_thresholds_and_intermediates():
    w = load_weights(SHIPPED)
    loose = refghost.run(str(SAMPLE_IMAGE), w)
    strict = refghost.run(str(SAMPLE_IMAGE), w, score_threshold=0.1, max_detections=3, intermediates=True)
    assert len(strict["detections.scores"]) == min(3, int((loose["detections.scores"] > 0.1).sum()))
    assert strict["decode.scores"].shape == (1, 2125, 80) and strict["decode.boxes"].shape == (1, 2125, 4)
    assert "backbone.stage2.0.branch1.0" in strict and "fpn.top_down_blocks.0.blocks.0" in strict
    with pytest.raises(RefghostError, match="a detector's post-processing"):
        refghost.run(str(SAMPLE_IMAGE), str(REPO / "weights" / "ghostnet_nanodet_1.0x.h5"), score_threshold=0.5)
    with pytest.raises(RefghostError, match="engine"):
        refghost.run(str(SAMPLE_IMAGE), w, impl="engine")


# --- the command line -----------------------------------------------------------------------


def test_cli_run_prints_writes_and_draws_the_detections(tmp_path, capsys):
    out_json, out_png, out_npz = tmp_path / "d.json", tmp_path / "d.png", tmp_path / "d.npz"
    assert main(["run", "--weights", str(SHIPPED), "--json", str(out_json), "--draw", str(out_png),
                 "--out", str(out_npz)]) == 0
    printed = capsys.readouterr().out
    records = json.loads(out_json.read_text())
    arrays = np.load(out_npz)
    assert len(records) == len(arrays["detections.scores"]) >= 1
    assert f"detected {len(records)} object" in printed
    for r, box, score, label in zip(records, arrays["detections.boxes"], arrays["detections.scores"],
                                    arrays["detections.labels"]):
        assert r["box"] == pytest.approx(box.tolist()) and r["score"] == pytest.approx(float(score))
        assert r["label"] == label and r["class"] == refghost.detector.classes.COCO_CLASSES[label]
        assert f"{r['class']:<16} {r['score']:.3f}" in printed
    drawn = np.asarray(Image.open(out_png).convert("RGB"))
    original = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    assert drawn.shape == original.shape and (drawn != original).any(axis=2).mean() > 0.005


@pytest.mark.parametrize("argv, message", [
    (["--json", "x.json"], "for a detector's weights"),
    (["--weights", str(SHIPPED), "--draw", "x.png", str(SAMPLE_IMAGE), str(SAMPLE_IMAGE)], "one image"),
    (["--weights", str(SHIPPED), "--impl", "engine"], "GhostNet backbones only"),
    (["--weights", str(SHIPPED), "--score-threshold", "1.5"], "--score-threshold must be in [0, 1)"),
    (["--weights", str(SHIPPED), "--draw", "x.unknown"], "unknown image extension"),
])
def test_cli_run_detector_option_errors_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- converting NanoDet checkpoints ----------------------------------------------------------


def lightning_checkpoint(path, model, aux=True):
    """A checkpoint laid out as NanoDet's Lightning trainer saves it: ``model.`` and the EMA
    ``avg_model.`` copies, with the training-only aux_fpn/aux_head."""
    sd = model.state_dict()
    state = {}
    for prefix in ("model.", "avg_model."):
        state.update({prefix + k: v.clone() for k, v in sd.items()})
        if aux:
            state.update({prefix + "aux_fpn." + k[len("fpn."):]: v.clone() for k, v in sd.items()
                          if k.startswith("fpn.")})
    torch.save({"epoch": 3, "state_dict": state}, path)


def test_cli_convert_with_config_runs_like_the_model(tmp_path, capsys):
    model = tn.randomize(tn.build(PRESETS["nanodet-plus-m_320"]), seed=5)
    lightning_checkpoint(tmp_path / "model_best.ckpt", model)
    assert main(["convert", str(tmp_path / "model_best.ckpt"), "--config", str(CONFIGS / "nanodet-plus-m_320.yml"),
                 "--out", str(tmp_path / "plus.h5")]) == 0
    printed = capsys.readouterr().out
    assert "avg_model (EMA)" in printed and "dropped aux_fpn.*" in printed and "dropped model.*" in printed
    w = load_weights(tmp_path / "plus.h5")
    assert w.config == PRESETS["nanodet-plus-m_320"] and w.class_names[0] == "person"
    x = np.random.default_rng(0).standard_normal((1, 3, 320, 320))
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x), export=True).numpy()
    got = refghost.run(x, w, dtype="float64")["output"]
    assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max()


def test_cli_convert_infers_a_detector_and_says_what_it_assumed(tmp_path, capsys):
    model = tn.randomize(tn.build(PRESETS["nanodet-m"]), seed=6)
    lightning_checkpoint(tmp_path / "m.ckpt", model, aux=False)
    assert main(["convert", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "m.h5")]) == 0
    printed = capsys.readouterr().out
    assert "inferred from the tensors' shapes" in printed and "assumed" in printed
    assert load_weights(tmp_path / "m.h5").config == PRESETS["nanodet-m"]


def test_cli_convert_backbone_of_a_detector_names_what_it_left(tmp_path, capsys):
    config = PRESETS["ghostnet-pan-nanodet"]
    model = tn.randomize(tn.build(config), seed=7)
    lightning_checkpoint(tmp_path / "g.ckpt", model)
    assert main(["convert", str(tmp_path / "g.ckpt"), "--arch", "nanodet", "--out", str(tmp_path / "g.h5")]) == 0
    printed = capsys.readouterr().out
    assert "left out" in printed and "fpn.*" in printed and "head.*" in printed and "aux_fpn.*" in printed
    assert load_weights(tmp_path / "g.h5").config.arch == "nanodet"
    assert main(["convert", str(tmp_path / "g.ckpt"), "--config", str(CONFIGS / "nanodet-m.yml"), "--width", "1",
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert "describe a GhostNet backbone" in capsys.readouterr().err


# --- golden files of a detector --------------------------------------------------------------


@pytest.fixture(scope="module")
def detector_golden(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "plus.h5"
    assert main(["golden", "--weights", str(SHIPPED), "--out", str(path)]) == 0
    return path


def test_detector_golden_holds_decode_and_detections_within_bounds(detector_golden, tmp_path, capsys):
    from refghost.verify.golden import DETECTOR_STAGES, read_golden

    golden = read_golden(detector_golden)
    assert list(golden.detector) == list(DETECTOR_STAGES)
    assert golden.attrs["score_threshold"] == 0.05 and golden.attrs["max_detections"] == 100
    run = refghost.run(str(SAMPLE_IMAGE), SHIPPED, intermediates=True)
    np.testing.assert_array_equal(golden.input, prepare_batch([str(SAMPLE_IMAGE)], load_weights(SHIPPED),
                                                              "float32").x)
    for name in ("decode.scores", "decode.boxes"):  # an honest float32 run is within the stored bounds
        error = np.abs(run[name] - golden.detector[name])
        assert (error <= golden.bounds[name]).all() and (golden.bounds[name] > 0).any(), name
    # far from every decision threshold here (the least margin is a score 1.6% above 0.05), the
    # float32 run keeps the same detections as the oracle
    np.testing.assert_array_equal(run["detections.labels"], golden.detector["detections.labels"])
    np.testing.assert_allclose(run["detections.boxes"], golden.detector["detections.boxes"], atol=1e-2)
    np.testing.assert_array_equal(golden.detector["preprocess.original_sizes"], [[480, 360]])
    np.savez(tmp_path / "run.npz", **run)
    capsys.readouterr()
    assert main(["compare", str(detector_golden), str(tmp_path / "run.npz")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_detector_golden_structure_is_checked(detector_golden, tmp_path):
    import shutil

    from refghost.errors import GoldenError
    from refghost.verify.golden import read_golden

    broken = tmp_path / "no_detector.h5"
    shutil.copy(detector_golden, broken)
    with h5py.File(broken, "r+") as f:
        del f["detector"]
    with pytest.raises(GoldenError, match="'detector' is missing"):
        read_golden(broken)
    shutil.copy(detector_golden, broken)
    with h5py.File(broken, "r+") as f:
        del f["detector"]["decode.boxes"]
        f["detector"].create_dataset("decode.boxes", data=np.zeros((1, 2125, 5)))
    with pytest.raises(GoldenError, match="holds|shape"):
        read_golden(broken)


def test_compare_judges_the_stages_around_the_network(detector_golden, tmp_path, capsys):
    """A dump with the candidate's input, decode and detections (refghost run --out keys plus
    "input") is judged stage by stage; a swapped-channel input is the first divergence."""
    w = load_weights(SHIPPED)
    run = refghost.run(str(SAMPLE_IMAGE), w, intermediates=True)
    arrays = {k: v for k, v in run.items() if k == "output" or k.startswith(("decode.", "detections."))}
    arrays["input"] = prepare_batch([str(SAMPLE_IMAGE)], w, "float32").x
    np.savez(tmp_path / "honest.npz", **arrays)
    capsys.readouterr()
    assert main(["compare", str(detector_golden), str(tmp_path / "honest.npz"), "--json",
                 str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    for stage in ("input", "decode", "detections"):
        assert f"stage     {stage}: PASS" in printed
    assert [s["verdict"] for s in json.loads((tmp_path / "r.json").read_text())["stages"]] == ["pass"] * 3
    arrays["input"] = np.ascontiguousarray(arrays["input"][:, ::-1])
    np.savez(tmp_path / "swapped.npz", **arrays)
    assert main(["compare", str(detector_golden), str(tmp_path / "swapped.npz")]) == 1
    printed = capsys.readouterr().out
    assert "stage     input: FAIL" in printed and "channels swapped" in printed
    assert "first divergent: input" in printed
