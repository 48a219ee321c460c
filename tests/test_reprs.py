"""The public objects have short reprs (a notebook prints them): the facts, not the arrays."""

import numpy as np

from refghost.verify.compare import compare
from refghost.verify.golden import make_golden, read_golden, write_golden
from refghost.weights import load_weights


def test_weights_graph_golden_report_reprs_are_short_and_say_what_they_hold(weights_file, tmp_path):
    w = load_weights(weights_file)
    text = repr(w)
    assert len(text) < 600, len(text)
    assert "arch='nanodet'" in text and "428 arrays" in text and str(weights_file) in text and w.sha256[:12] in text
    assert len(repr(w.graph)) < 600 and "284 nodes" in repr(w.graph)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    write_golden(tmp_path / "g.h5", make_golden(w, x, intermediates=True))
    golden = read_golden(tmp_path / "g.h5")
    assert len(repr(golden)) < 600 and "(1, 3, 64, 64)" in repr(golden) and "intermediates" in repr(golden)
    report = compare(golden, {name: golden.outputs[name] + 1.0 for name in golden.outputs})
    text = repr(report)
    assert len(text) < 600 and text.startswith("Report(FAIL") and "3 tensors, 3 not ok" in text, text
