"""`refghost compare --html/--plots`: the page's content and order, and its rendering in a real
headless browser (Debian's chromium): charts drawn, nothing fetched, a screenshot that is not blank."""

import copy
import re
import sys

import numpy as np
import pytest
import torch_ghostnet as tg
from browser import assert_renders_offline
from PIL import Image

import refghost
from refghost.arch import Config
from refghost.cli import main
from refghost.forward import execute
from refghost.verify.golden import make_golden, write_golden
from refghost.weights import from_tensors

CONFIG = Config(width=0.5, activation="LeakyReLU", out_stages=(4, 6, 9))
BAD_LAYER = "blocks.6.0.ghost2.primary_conv.0"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    weights = from_tensors(tg.state_dict_numpy(tg.randomize(tg.build("nanodet", 0.5, "LeakyReLU"), seed=3)), CONFIG)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    write_golden(folder / "g.h5", make_golden(weights, x, intermediates=True))
    np.savez(folder / "good.npz", **refghost.run(x, weights, intermediates=True))
    params = dict(weights.params("float32"))
    w = params[BAD_LAYER + ".weight"].copy()
    w[3, 7, 0, 0] *= np.float32(1.01)  # one weight +1%: a wrong port of one layer
    params[BAD_LAYER + ".weight"] = w
    np.savez(folder / "bad.npz", **execute(copy.deepcopy(weights.graph), params, x, intermediates=True))
    return folder


def _compare(env, candidate, *extra):
    return main(["compare", str(env / "g.h5"), str(env / candidate), *extra])


def _no_external_reference(page: str):
    assert "http://" not in page and "https://" not in page
    for attr in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page):
        assert attr.startswith(("data:", "#")), attr


def test_failing_report_verdict_first_and_pictures(env, tmp_path, capsys):
    plots = tmp_path / "plots"
    plots.mkdir()
    assert _compare(env, "bad.npz", "--html", str(tmp_path / "r.html"), "--plots", str(plots)) == 1
    page = (tmp_path / "r.html").read_text()
    body = page[page.index("<body>"):]
    assert body.index("FAIL") < body.index("<svg")  # the verdict before any chart
    assert f"first divergent layer:</b> <code>{BAD_LAYER}</code>" in page
    assert page.count("<svg") >= 2  # the ratio chart and at least the first divergent's picture
    assert f"where the error of {BAD_LAYER} sits" in page
    assert page.index(f"where the error of {BAD_LAYER} sits") < page.index("Every compared tensor")
    assert page.count("<tr class=") == sum(1 for _ in refghost.verify.golden.read_golden(env / "g.h5").tensors())
    _no_external_reference(page)
    pngs = sorted(p.name for p in plots.iterdir())
    assert "ratios.png" in pngs and f"layer-{BAD_LAYER}.png" in pngs
    with Image.open(plots / "ratios.png") as im:
        assert im.size[0] > 500


def test_passing_report_and_errors(env, tmp_path, capsys):
    assert _compare(env, "good.npz", "--html", str(tmp_path / "p.html")) == 0
    page = (tmp_path / "p.html").read_text()
    assert "<span class='pass'>PASS</span>" in page and page.count("<svg") == 1  # no failing layer to draw
    _no_external_reference(page)
    capsys.readouterr()
    assert _compare(env, "good.npz", "--plots", str(tmp_path / "new" / "plots")) == 0  # a missing folder is made
    assert (tmp_path / "new" / "plots" / "ratios.png").is_file()
    (tmp_path / "file").write_text("")
    assert _compare(env, "good.npz", "--plots", str(tmp_path / "file")) == 2
    err = capsys.readouterr().err
    assert "--plots" in err and "exists and is not a folder" in err
    assert _compare(env, "good.npz", "--html", str(tmp_path / "no" / "r.html")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_matplotlib_names_the_extra(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is absent
    assert _compare(env, "good.npz", "--html", str(tmp_path / "r.html")) == 2
    err = capsys.readouterr()
    assert 'pip install "refghost[report]"' in err.err and not err.out  # refused before comparing
    assert not (tmp_path / "r.html").exists()


def test_rendered_in_headless_chromium(env, tmp_path):
    page = tmp_path / "r.html"
    assert _compare(env, "bad.npz", "--html", str(page)) == 1
    dom = assert_renders_offline(page, tmp_path)
    assert dom.count("<svg") >= 2 and "FAIL" in dom and BAD_LAYER in dom


def test_pictures_of_layers_that_fail_their_isolated_check_come_first(env):
    """The first divergent layer, then the other isolated failures (largest first), then the layers
    that only inherit an error, in network order."""
    import dataclasses

    from refghost.verify.compare import compare
    from refghost.verify.golden import read_golden
    from refghost.verify.report_html import _failing_layers

    golden = read_golden(env / "g.h5")
    report = compare(golden, dict(np.load(env / "bad.npz")))
    bad = [t.name for t in report.tensors if t.status == "mismatch"]
    assert _failing_layers(report)[0] == BAD_LAYER == report.first_divergent and len(bad) > 3
    fake = dataclasses.replace(report, isolated_failures=[(bad[-1], 9.0), (BAD_LAYER, 5.0)])
    order = _failing_layers(fake)
    assert order[:2] == [BAD_LAYER, bad[-1]]
    assert order[2:] == [n for n in bad if n not in (BAD_LAYER, bad[-1])][:len(order) - 2]


def test_the_chart_names_the_stages_on_its_x_axis(env):
    from refghost.verify.compare import compare
    from refghost.verify.golden import read_golden
    from refghost.verify.report_html import _ratio_chart, require_matplotlib, stage_starts

    golden = read_golden(env / "g.h5")
    report = compare(golden, dict(np.load(env / "good.npz")))
    names = [t.name for t in report.tensors]
    starts = stage_starts(names)
    assert list(starts.values())[:3] == ["stem", "blocks.0", "blocks.1"] and min(starts) == 0
    assert all(names[i] == s or names[i].startswith(s + ".") or s == "stem" for i, s in starts.items())
    plt = require_matplotlib()
    fig = _ratio_chart(plt, report)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(starts.values())
    plt.close(fig)


def test_the_set_table_has_no_empty_count_cells():
    from refghost.verify.report_html import _images

    assert _images([]) == "-" and _images(["a.png", "b.png"]) == "2: a.png, b.png"
