"""Verification over a folder of images (refghost.verify.dataset, `refghost compare --images`):
a bug that only bright images trigger is found on exactly those images and blamed on its layer,
honest images pass, exit statuses 0/1/2, goldens written per image and judged as a folder, a
2-worker LocalCluster gives the local run's report, and a worker that dies is retried or
reported as lost."""

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import dask
import distributed
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from PIL import Image
from browser import assert_renders_offline
from runtime_bank import export_onnx

from refghost.cli import DEFAULT_WEIGHTS, main
from refghost.verify.dataset import Candidate, ImageResult, Job, format_report, run_set, summarize
from refghost.weights import from_tensors, load_weights, save_weights

SIZE = 96
#: Image name -> grey level (each pixel +-4 around it). The bug clips blocks.1.0 at CLIP_AT, which
#: only the bright images reach (its maximum is 4-10 on levels 40..100, 12-16 on 220..250).
LEVELS = {"dark_040.png": 40, "dark_070.png": 70, "mid_100.png": 100, "bright_220.png": 220, "bright_250.png": 250}
BRIGHT = ["bright_220.png", "bright_250.png"]
BUG_LAYER = "blocks.1.0"
CLIP_AT = 11.0


def _with_clip(src: Path, out: Path) -> Path:
    """A copy of the ONNX model with a Clip(max=CLIP_AT) after blocks.1.0's residual Add."""
    model = onnx.load(str(src))
    g = model.graph
    i, add = next((i, n) for i, n in enumerate(g.node)
                  if n.name.startswith(f"/blocks.1/{BUG_LAYER}/") and n.op_type == "Add")
    name = add.output[0]
    add.output[0] = name + "_unclipped"
    g.initializer.extend([numpy_helper.from_array(np.array(-1e30, np.float32), "bug_min"),
                          numpy_helper.from_array(np.array(CLIP_AT, np.float32), "bug_max")])
    g.node.insert(i + 1, helper.make_node("Clip", [name + "_unclipped", "bug_min", "bug_max"], [name],
                                          name=f"/blocks.1/{BUG_LAYER}/Clip"))
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The shipped weights at SIZE x SIZE, the images of LEVELS, an honest and a clipping ONNX export."""
    folder = tmp_path_factory.mktemp("dataset")
    shipped = load_weights(str(DEFAULT_WEIGHTS))
    weights = from_tensors(shipped.tensors, shipped.config,
                           dataclasses.replace(shipped.preprocessing, input_size=(SIZE, SIZE)))
    save_weights(folder / "w.h5", weights)
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, level in LEVELS.items():
        pixels = np.clip(level + rng.integers(-4, 5, (80, 100, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / name)
    honest = export_onnx(weights, SIZE, folder / "honest.onnx")
    return {"folder": folder, "weights": str(folder / "w.h5"), "images": str(images), "honest": str(honest),
            "bug": str(_with_clip(honest, folder / "bug.onnx"))}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as c:
        yield c


def _compare(bench, model, tmp_path, *extra, images=None):
    out = tmp_path / "r.json"
    status = main(["compare", "--images", images or bench["images"], "--weights", bench["weights"], model,
                   "--json", str(out), *extra])
    return status, (json.loads(out.read_text()) if out.exists() else None)


def _without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


@pytest.fixture(scope="module")
def local_run(bench, tmp_path_factory):
    """The bug model over the folder on 2 local workers (a LocalCluster of refghost's own): exit
    status, JSON report, its folder and what it wrote to stderr."""
    tmp = tmp_path_factory.mktemp("local")
    (tmp / "kept").mkdir()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status, report = _compare(bench, bench["bug"], tmp, "--workers", "2", "--keep-failing", str(tmp / "kept"),
                                  "--html", str(tmp / "r.html"))
    return status, report, tmp, stderr.getvalue()


def test_bug_found_on_exactly_the_bright_images(local_run):
    status, report, tmp, progress = local_run
    # the progress bar on stderr: images done of the total, failures so far, rate
    assert "5/5" in progress and "2 failed or not judged" in progress and "image/s" in progress
    assert status == 1
    assert [f["image"] for f in report["failing"]] == BRIGHT
    assert all(f["first_divergent"] == BUG_LAYER for f in report["failing"])
    assert report["counts"] == {"pass": 3, "fail": 2}
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers[BUG_LAYER]["first_divergent_in"] == BRIGHT
    assert layers[BUG_LAYER]["failing_images"] == BRIGHT
    assert layers[BUG_LAYER]["worst_isolated"] > 1 and layers[BUG_LAYER]["worst_isolated_image"] in BRIGHT
    before = report["layers"][:[layer["name"] for layer in report["layers"]].index(BUG_LAYER)]
    assert before and all(not layer["failing_images"] for layer in before)
    assert all(i["status"] == ("fail" if i["image"] in BRIGHT else "pass") for i in report["images"])
    # only the failing images are kept: golden (with intermediates), candidate tensors, report
    kept = sorted(p.name for p in (tmp / "kept").iterdir())
    assert kept == sorted(f"{Path(n).stem}{ext}" for n in BRIGHT for ext in (".h5", ".candidate.npz", ".json"))
    single = json.loads((tmp / "kept" / "bright_250.json").read_text())
    assert single["first_divergent"] == BUG_LAYER and not single["passed"]
    page = (tmp / "r.html").read_text()
    assert "<svg" in page and "bright_220.png" in page and BUG_LAYER in page and "http" not in page.split("<svg")[0]


def test_set_report_rendered_in_headless_chromium(local_run, tmp_path):
    dom = assert_renders_offline(local_run[2] / "r.html", tmp_path)
    assert "<svg" in dom and BUG_LAYER in dom and all(name in dom for name in BRIGHT)


def test_honest_model_passes_every_image_and_cluster_matches_local(bench, cluster, local_run, tmp_path, capsys):
    status, report = _compare(bench, bench["honest"], tmp_path, "--scheduler", cluster.scheduler_address)
    assert status == 0 and report["passed"] and report["counts"] == {"pass": 5, "fail": 0}
    assert all(layer["worst_accumulated"] <= 1 for layer in report["layers"])
    # the same tasks on a 2-worker LocalCluster given by its address give the local run's report
    status, on_cluster = _compare(bench, bench["bug"], tmp_path, "--scheduler", cluster.scheduler_address)
    local_status, local, _, _ = local_run
    assert status == local_status == 1
    assert _without_timing(on_cluster) == _without_timing(local) | {
        "failing": [dict(f, kept=[]) for f in local["failing"]]}
    out = capsys.readouterr().out
    assert "bright_220.png  blocks.1.0" in out and "FAIL: 3 of 5 images pass, 2 fail" in out


def test_exit_2_on_unusable_input(bench, cluster, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _compare(bench, bench["honest"], tmp_path, images=str(empty))[0] == 2
    assert _compare(bench, str(tmp_path / "missing.onnx"), tmp_path)[0] == 2
    assert main(["compare", "--images", bench["images"], "--weights", bench["weights"], bench["honest"],
                 "--workers", "0"]) == 2
    # an unreadable image is reported and the others are still judged
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("dark_040.png", "mid_100.png"):
        (mixed / name).write_bytes((Path(bench["images"]) / name).read_bytes())
    (mixed / "broken.png").write_bytes(b"not a png")
    status, report = _compare(bench, bench["honest"], tmp_path, "--scheduler", cluster.scheduler_address,
                              "--html", str(tmp_path / "mixed.html"), images=str(mixed))
    assert status == 2 and report["counts"] == {"pass": 2, "fail": 0, "error": 1}
    assert [e["image"] for e in report["not_judged"]] == ["broken.png"] and report["not_judged"][0]["error"]
    page = (tmp_path / "mixed.html").read_text()
    assert "<span class='not-judged'>NOT JUDGED</span>" in page and "FAIL" not in page
    # a bug found beats an image not judged: exit 1
    (mixed / "bright_250.png").write_bytes((Path(bench["images"]) / "bright_250.png").read_bytes())
    status, report = _compare(bench, bench["bug"], tmp_path, "--scheduler", cluster.scheduler_address,
                              images=str(mixed))
    assert status == 1 and [f["image"] for f in report["failing"]] == ["bright_250.png"]


def test_exit_2_before_any_work_on_arrays_or_a_bad_scheduler(bench, tmp_path, capsys):
    """A dump of one input is no model for a set, and a scheduler address distributed cannot
    parse is a documented error, not a traceback."""
    np.savez(tmp_path / "dump.npz", x=np.zeros(3))
    assert _compare(bench, str(tmp_path / "dump.npz"), tmp_path)[0] == 2
    assert "no runtime runs .npz" in capsys.readouterr().err
    assert _compare(bench, bench["honest"], tmp_path, "--scheduler", "foo://nowhere:1")[0] == 2
    assert "--scheduler foo://nowhere:1: no Dask scheduler answers there" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_failed_tensor_stays_the_worst_of_its_layer_whatever_the_image_order():
    """A NaN ratio (wrong shape, or NaN where the oracle is finite) is worse than any number in
    the per-layer summary, the per-image worst and the text report, in either order of images."""
    broken = ImageResult("a.png", "fail", "blocks.0.0", layers=[["blocks.0.0", "shape", math.nan, None]])
    fine = ImageResult("b.png", "fail", "blocks.0.0", layers=[["blocks.0.0", "mismatch", 3.5, 2.0]])
    for order in ([broken, fine], [fine, broken]):
        report = summarize("set", "m.onnx", order)
        (layer,) = report.layers
        assert math.isnan(layer.worst_accumulated) and layer.worst_accumulated_image == "a.png"
        assert layer.worst_isolated == 2.0 and layer.failing_images == ["a.png", "b.png"]
        assert [i["worst_accumulated"] for i in report.to_json()["images"]] == [None, 3.5]
        assert "worst accumulated error / bound: nan (blocks.0.0, on a.png)" in format_report(report)


def test_goldens_per_image_then_compare_the_folder(bench, cluster, local_run, tmp_path):
    gold = tmp_path / "gold"
    assert main(["golden", "--images", bench["images"], "--weights", bench["weights"], "--out", str(gold),
                 "--intermediates", "--scheduler", cluster.scheduler_address]) == 0
    assert sorted(p.name for p in gold.iterdir()) == sorted(f"{Path(n).stem}.h5" for n in LEVELS)
    out = tmp_path / "r.json"
    assert main(["compare", str(gold), bench["bug"], "--json", str(out), "--scheduler",
                 cluster.scheduler_address]) == 1
    report = json.loads(out.read_text())
    assert [(f["image"], f["first_divergent"]) for f in report["failing"]] == [("bright_220.h5", BUG_LAYER),
                                                                              ("bright_250.h5", BUG_LAYER)]
    # the goldens read back judge as the in-memory ones did, ratio for ratio
    assert [layer["worst_accumulated"] for layer in report["layers"]] == \
        [layer["worst_accumulated"] for layer in local_run[1]["layers"]]


def _crash_on(crashes: dict[str, str]):
    """A Dask worker plugin that makes each worker's task of a source named in ``crashes`` end its
    worker process (``os._exit``): the first time only when the value is a marker file's path
    (which it then creates), every time when it is ``always``. It wraps
    ``refghost.verify.dataset.run_task`` in the worker (``client.map`` sends the function by name),
    at each worker's start, restarted workers included; refghost itself has no test hook."""
    class CrashOn(distributed.WorkerPlugin):
        name = "crash-on"

        def setup(self, worker):
            import os

            from refghost.verify import dataset

            run_task = dataset.run_task

            def crashing(job, source):
                marker = crashes.get(os.path.basename(source))
                if marker == "always" or (marker is not None and not os.path.exists(marker)):
                    if marker != "always":
                        open(marker, "w").close()
                    os._exit(13)
                return run_task(job, source)

            dataset.run_task = crashing

    return CrashOn()


def test_a_worker_that_dies_is_retried_or_reported_lost(bench, tmp_path):
    """dark_040's first attempt kills its worker (retried: passes on the second); bright_250 kills
    every worker it runs on (lost after Dask's allowed failures); the other images are judged."""
    images = sorted(str(p) for p in Path(bench["images"]).iterdir())
    job = Job(weights=bench["weights"], warp_kernel="fixed_point", candidate=Candidate(bench["honest"]))
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0}):
        with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      dashboard_address=":0") as c, distributed.Client(c) as client:
            client.register_plugin(_crash_on({"dark_040.png": str(tmp_path / "died-once"),
                                              "bright_250.png": "always"}))
            results = run_set(job, images, cluster=c, progress=False)
    assert (tmp_path / "died-once").exists()
    report = summarize(bench["images"], bench["honest"], results)
    by_name = {r.name: r for r in report.images}
    assert by_name["dark_040.png"].status == "pass" and by_name["dark_040.png"].attempts == 2
    assert by_name["bright_250.png"].status == "lost" and "died" in by_name["bright_250.png"].error
    assert by_name["bright_250.png"].attempts == 2
    assert all(by_name[n].status == "pass" for n in ("dark_070.png", "mid_100.png", "bright_220.png"))
    assert report.exit_status == 2
    data = report.to_json()
    assert data["retried"] == [{"image": "bright_250.png", "attempts": 2}, {"image": "dark_040.png", "attempts": 2}]
    assert data["not_judged"][0]["image"] == "bright_250.png"
