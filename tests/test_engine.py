"""The compiled engine (refghost/engine/, refghost/kernels/depthwise.py, refghost/kernels/blas.py).

Every tolerance comes from refghost.bounds, none is written here:

* one fused kernel (a conv with its bias, activation and residual; the squeeze-excite) and the
  plain ops it replaces, both in the same dtype: each within the worst-case bound of
  :func:`refghost.bounds.segment_bound` over the chain of nodes the kernel fuses, around the
  float64 oracle of that chain (computed by the interpreter, not by the engine's kernels);
* a whole network against the plain interpreter: both are honest implementations, each within
  the accumulated (probabilistic) bound of :func:`refghost.bounds.error_bounds` of the exact
  result, so they are within twice that bound of each other;
* float64 likewise with u = 2^-53: speed never moves the oracle beyond its bound.
"""

import numba
import numpy as np
import pytest
from conftest import numba_threads, random_weights

import refghost
from refghost import engine, ops
from refghost.arch import Config, Graph, Node
from refghost.bounds import FLOAT32_U, FLOAT64_U, UNDERFLOW, error_bounds, segment_bound
from refghost.errors import RefghostError
from refghost.forward import execute
from refghost.engine import lower, pointwise, program, recognise, squeeze_excite, stem
from refghost.kernels import depthwise, epilogue
from refghost.threads import single_threaded_blas

U = {"float32": FLOAT32_U, "float64": FLOAT64_U}


def _rng(seed):
    return np.random.default_rng(seed)


# --- kernels against the plain ops -------------------------------------------------------------


def _buffer(x):
    """(N, C, H, W) -> the engine layout (N, 1 + C, H*W) with the ones row first."""
    n, c, h, w = x.shape
    buf = np.empty((n, c + 1, h * w), x.dtype)
    buf[:, 0] = 1
    buf[:, 1:] = x.reshape(n, c, h * w)
    return buf


#: The engine's activation codes as the activation nodes of refghost.arch (ACT_NONE: no node).
ACTIVATIONS = {epilogue.ACT_RELU: "ReLU", epilogue.ACT_LEAKY: "LeakyReLU", epilogue.ACT_RELU6: "ReLU6"}


def _conv_node(name, src, *, stride=1, padding=0, groups=1):
    """A conv node with a bias reading ``<name>.weight`` and ``<name>.bias``."""
    return Node(name, "conv", (src,), {"weight": f"{name}.weight", "bias": f"{name}.bias"},
                {"stride": stride, "padding": padding, "groups": groups})


def _then_act(nodes, code):
    """``nodes`` followed by the activation of engine code ``code`` (none for ACT_NONE)."""
    if code == epilogue.ACT_NONE:
        return nodes
    return [*nodes, Node("act", "act", (nodes[-1].name,), attrs={"activation": ACTIVATIONS[code]})]


def assert_within_chain_bound(nodes, leaves, params, dtype, *results):
    """Each of ``results`` within the worst-case bound of refghost.bounds.segment_bound of the chain
    ``nodes`` (in forward order, the last one the output) around its float64 value: the rounding
    of an honest ``dtype`` evaluation of the chain from the exact ``leaves`` (``{name: array}``),
    whatever its summation orders. ``params`` maps the nodes' parameter keys to arrays."""
    graph = Graph(Config(), list(nodes), {"output": nodes[-1].name}, {})
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    value, bound = segment_bound(graph, [n.name for n in nodes], leaves, p64, u=U[dtype], eta=UNDERFLOW[dtype])
    for got in results:
        assert got.shape == value.shape
        err = np.abs(np.asarray(got, np.float64) - value)
        assert (err <= bound).all(), f"max error/bound {np.max(err / bound):.3g}"


def _plain_act(code, slope, y):
    if code == epilogue.ACT_RELU:
        return ops.relu(y)
    if code == epilogue.ACT_LEAKY:
        return np.where(y > 0, y, y * y.dtype.type(slope))
    if code == epilogue.ACT_RELU6:
        return ops.relu6(y)
    return y


DW_CASES = [  # (N, C, H, W, K, stride, act, residual, pre-residual)
    (1, 5, 16, 16, 3, 1, epilogue.ACT_RELU, False, False),
    (2, 3, 13, 9, 3, 1, epilogue.ACT_NONE, True, True),
    (1, 4, 10, 10, 3, 2, epilogue.ACT_NONE, False, False),
    (1, 3, 11, 7, 3, 2, epilogue.ACT_LEAKY, False, False),
    (2, 2, 20, 20, 5, 2, epilogue.ACT_RELU6, True, False),
    (1, 2, 9, 13, 5, 2, epilogue.ACT_NONE, False, False),
    (1, 3, 12, 11, 5, 1, epilogue.ACT_RELU, True, True),
    (1, 2, 15, 15, 7, 3, epilogue.ACT_LEAKY, False, False),  # the generic tap-by-tap path
    (3, 40, 3, 4, 3, 1, epilogue.ACT_RELU, False, False),  # planes smaller than the kernel reach
    (1, 37, 10, 10, 3, 1, epilogue.ACT_LEAKY, True, True),  # 3 channel groups, the last partial
    (1, 7, 1, 1, 3, 2, epilogue.ACT_NONE, False, False),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-a{c[6]}-r{int(c[7])}{int(c[8])}")
@pytest.mark.parametrize("variant", ["planes", "planes-parallel", "blocked", "blocked-parallel"])
def test_fused_depthwise_matches_plain_ops(case, dtype, variant):
    n, c, h, w, k, s, act, with_res, with_pre = case
    rng = _rng(hash(case) % 2**32)
    p = (k - 1) // 2
    ho, wo = ops.conv_output_size(h, k, s, p), ops.conv_output_size(w, k, s, p)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((c, 1, k, k)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    slope = ops.LEAKY_RELU_SLOPE
    # ghost layout: source in rows [1, 1+c), output in rows [1+c, 1+2c) of the same buffer
    buf = _buffer(np.concatenate([x, np.zeros((n, c, h, w), dtype)], axis=1)) if s == 1 else _buffer(x)
    dst = buf if s == 1 else _buffer(np.zeros((n, c, ho, wo), dtype))
    d_row0 = 1 + c if s == 1 else 1
    res = rng.standard_normal((n, 2 * c, ho, wo)).astype(dtype)
    resb = _buffer(res)
    pre_row0 = 1 if (with_pre and s == 1) else -1
    consts = epilogue.make_consts(dtype, slope)
    wk = wt.reshape(c, k * k)
    if variant.startswith("blocked"):
        wk = depthwise.blocked_weights(wk, wo)
    args = (buf, 1, dst, d_row0, resb, 1 + c, pre_row0, c, h, w, ho, wo, wk, b, k, s, p, act, consts, with_res)
    kernels = {"planes": depthwise.depthwise, "blocked": depthwise.depthwise_blocked,
               "planes-parallel": depthwise.depthwise_parallel, "blocked-parallel": depthwise.depthwise_blocked_parallel}
    if variant.endswith("parallel"):
        kernels[variant](*args, 3)
    else:
        kernels[variant](*args)
    got = dst[:, d_row0:d_row0 + c].reshape(n, c, ho, wo)

    want = _plain_act(act, slope, ops.conv2d(x, wt, b, stride=s, padding=p, groups=c))
    chain = _then_act([_conv_node("dw", "input", stride=s, padding=p, groups=c)], act)
    if with_res:
        want = want + res[:, c:]
        chain.append(Node("add", "add", (chain[-1].name, "residual")))
    assert got.dtype == np.dtype(dtype)
    assert_within_chain_bound(chain, {"input": x, "residual": res[:, c:]}, {"dw.weight": wt, "dw.bias": b}, dtype,
                              got, want)
    if pre_row0 >= 0:  # the source half got the other half of the residual, exactly one rounding
        np.testing.assert_array_equal(buf[:, 1:1 + c].reshape(n, c, h, w), x + res[:, :c])
    else:
        np.testing.assert_array_equal(buf[:, 1:1 + c].reshape(n, c, h, w), x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 24, 17, 40, 40), (2, 56, 481, 20, 20), (3, 5, 9, 1, 3), (1, 960, 161, 10, 10),
                                   (1, 16, 28, 160, 160)])
@pytest.mark.parametrize("act", [epilogue.ACT_NONE, epilogue.ACT_RELU, epilogue.ACT_LEAKY, epilogue.ACT_RELU6])
def test_gemm_tiles_match_plain_conv(shape, dtype, act):
    n, m, k, h, w = shape
    rng = _rng(m * k + h)
    x = rng.standard_normal((n, k - 1, h, w)).astype(dtype)
    wt = rng.standard_normal((m, k - 1, 1, 1)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    xb = _buffer(x)
    y = np.full((n, m + 3, h * w), np.nan, dtype)
    tasks = lower.gemm_tasks(n, m, k, h * w)
    covered = np.zeros((n, m, h * w), int)
    for img, m0, m1, j0, j1 in tasks:
        covered[img, m0:m1, j0:j1] += 1
    assert (covered == 1).all()  # the tiles partition the output exactly
    wb = np.ascontiguousarray(np.concatenate([b[:, None], wt.reshape(m, k - 1)], axis=1))
    consts = epilogue.make_consts(dtype, ops.LEAKY_RELU_SLOPE)
    for task in tasks:  # the engine hands these tiles to its threads in any order
        pointwise.gemm_task(wb, xb, y, 2, task, act, consts)
    got = y[:, 2:2 + m].reshape(n, m, h, w)
    assert np.isnan(y[:, :2]).all() and np.isnan(y[:, 2 + m:]).all()  # nothing written outside
    want = _plain_act(act, ops.LEAKY_RELU_SLOPE, ops.conv2d(x, wt, b))
    assert_within_chain_bound(_then_act([_conv_node("pw", "input")], act), {"input": x},
                              {"pw.weight": wt, "pw.bias": b}, dtype, got, want)
    backwards = np.full_like(y, np.nan)
    for task in tasks[::-1]:
        pointwise.gemm_task(wb, xb, backwards, 2, task, act, consts)
    np.testing.assert_array_equal(backwards, y)  # the same tiles in any order: the same bits


def _se_by_images(x, nch, wr_t, br, we_t, be, consts):
    """The SE of :func:`squeeze_excite.se_op` for a batch of at least the thread count: one
    :func:`squeeze_excite.se_image` per image."""
    pooled, hidden, lanes = np.empty(nch, x.dtype), np.empty(wr_t.shape[1], x.dtype), np.empty(squeeze_excite._LANES, x.dtype)
    for n in range(x.shape[0]):
        squeeze_excite.se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes)


def _se_by_chunks(x, nch, wr_t, br, we_t, be, consts, chunks):
    """The SE of :func:`squeeze_excite.se_op` for a batch smaller than the thread count: plane means,
    the first small conv and the second with the scaling, each in ``chunks`` chunks (run here one
    after the other, as any thread may take them)."""
    nr = wr_t.shape[1]
    pooled, hidden, lanes = np.empty(nch, x.dtype), np.empty(nr, x.dtype), np.empty(squeeze_excite._LANES, x.dtype)
    part = lambda i, size: (i * size // chunks, (i + 1) * size // chunks)  # noqa: E731
    for n in range(x.shape[0]):
        for i in reversed(range(chunks)):
            squeeze_excite.se_means(x, n, *part(i, nch), pooled, lanes)
        for i in reversed(range(chunks)):
            squeeze_excite.se_hidden(pooled, wr_t, br, *part(i, nr), hidden, consts)
        for i in reversed(range(chunks)):
            squeeze_excite.se_scale(x, n, hidden, we_t, be, *part(i, nch), consts)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, c, r, hw", [(1, 72, 20, 1600), (2, 960, 240, 100), (1, 8, 4, 7)])
def test_squeeze_excite_matches_plain_ops(dtype, n, c, r, hw):
    rng = _rng(c + hw)
    x = np.abs(rng.standard_normal((n, c, hw, 1))).astype(dtype)  # post-ReLU-like: all positive
    wr = (rng.standard_normal((r, c, 1, 1)) / np.sqrt(c)).astype(dtype)
    br = rng.standard_normal(r).astype(dtype)
    we = (rng.standard_normal((c, r, 1, 1)) / np.sqrt(r)).astype(dtype)
    be = rng.standard_normal(c).astype(dtype)
    buf = _buffer(x)
    args = (c, np.ascontiguousarray(wr.reshape(r, c).T), br, np.ascontiguousarray(we.reshape(c, r).T), be,
            epilogue.make_consts(dtype))
    _se_by_images(buf, *args)
    got = buf[:, 1:].reshape(x.shape).astype(np.float64)
    pooled = ops.global_avg_pool(x)
    hidden = ops.relu(ops.conv2d(pooled, wr, br))
    gate = ops.hard_sigmoid(ops.conv2d(hidden, we, be))
    want = x * gate
    chain = [Node("pool", "global_avg_pool", ("input",)), _conv_node("reduce", "pool"),
             Node("relu", "act", ("reduce",), attrs={"activation": "ReLU"}), _conv_node("expand", "relu"),
             Node("gate", "hard_sigmoid", ("expand",)), Node("se", "scale", ("input", "gate"))]
    params = {"reduce.weight": wr, "reduce.bias": br, "expand.weight": we, "expand.bias": be}
    assert_within_chain_bound(chain, {"input": x}, params, dtype, got, want)
    by_chunks = _buffer(x)
    _se_by_chunks(by_chunks, *args, 3)
    np.testing.assert_array_equal(by_chunks, buf)  # a small batch split over threads: the same bits


# --- whole networks against the plain interpreter ------------------------------------------------

NETWORKS = [  # (config, input shape)
    (Config(), (1, 3, 64, 64)),
    (Config(width=0.5, activation="LeakyReLU", out_stages=tuple(range(10))), (2, 3, 37, 45)),
    (Config(width=0.75, activation="PReLU", out_stages=(2, 5, 8)), (1, 3, 33, 47)),
    (Config(width=1.3, activation="ReLU6", out_stages=(0, 9)), (1, 3, 40, 28)),
    (Config(width=0.5, activation="GELU", out_stages=(4, 6, 9)), (1, 3, 32, 32)),
    (Config(width=0.5, activation="HardSwish", out_stages=(1, 3, 7)), (1, 3, 24, 40)),
    (Config(width=0.5, activation="SiLU", out_stages=(9,)), (1, 3, 29, 31)),
    (Config(width=0.5, activation="SELU", out_stages=(4,)), (1, 3, 32, 32)),
    (Config(width=0.5, activation="ELU", out_stages=(6,)), (1, 3, 17, 23)),
    (Config(width=0.5, activation="Identity", out_stages=(9,)), (1, 3, 32, 32)),
    (Config(arch="ghostnet", num_classes=10), (2, 3, 48, 48)),
]


def _network_id(case):
    cfg, shape = case
    return f"{cfg.arch}-{cfg.width:g}-{cfg.activation}-{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", NETWORKS, ids=_network_id)
def test_engine_matches_plain_interpreter_within_twice_the_accumulated_bound(case, dtype):
    config, shape = case
    weights = random_weights(config, seed=3)
    x = _rng(1).standard_normal(shape).astype(dtype)
    got = refghost.run(x, weights, dtype=dtype, impl="engine")
    plain = execute(weights.graph, weights.params(dtype), x, impl="plain")
    _, bounds = error_bounds(weights.graph, weights.params("float64"), x.astype(np.float64), u=U[dtype])
    assert list(got) == list(plain)
    for name, node in weights.graph.outputs.items():
        assert got[name].dtype == np.dtype(dtype) and got[name].shape == plain[name].shape
        err = np.abs(got[name].astype(np.float64) - plain[name])
        assert (err <= 2 * bounds[node]).all(), f"{name}: {err.max():.3g}"


def test_shipped_weights_at_320_both_dtypes():
    from refghost.cli import DEFAULT_WEIGHTS

    weights = refghost.load_weights(DEFAULT_WEIGHTS)
    x = _rng(2).standard_normal((1, 3, 320, 320))
    for dtype in ("float32", "float64"):
        xd = x.astype(dtype)
        _, bounds = error_bounds(weights.graph, weights.params("float64"), xd.astype(np.float64), u=U[dtype])
        # the interpreter with its own fast ops (BLAS, Numba), itself tested against the plain ops
        plain = refghost.run(xd, weights, dtype=dtype, impl="interpreter")
        got = refghost.run(xd, weights, dtype=dtype)
        for name, node in weights.graph.outputs.items():
            err = np.abs(got[name].astype(np.float64) - plain[name])
            assert (err <= 2 * bounds[node]).all(), (dtype, name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, c, h, w, m, k, s, p, band", [
    (1, 3, 32, 32, 16, 3, 2, 1, 1), (2, 3, 17, 23, 8, 3, 2, 1, 3), (1, 2, 9, 8, 4, 5, 2, 2, 2),
    (1, 3, 10, 11, 5, 3, 1, 1, 4), (2, 1, 7, 7, 3, 3, 3, 0, 1), (1, 2, 6, 9, 4, 4, 2, 1, 10)])
def test_stem_bands_match_plain_conv(dtype, n, c, h, w, m, k, s, p, band):
    rng = _rng(h * w + k)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((m, c, k, k)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    ho, wo = ops.conv_output_size(h, k, s, p), ops.conv_output_size(w, k, s, p)
    wb = np.ascontiguousarray(np.concatenate([b[:, None], wt.reshape(m, -1)], axis=1))
    kk = wb.shape[1]
    y = np.full((n, m + 2, ho * wo), np.nan, dtype)
    consts = epilogue.make_consts(dtype)
    tile = np.full(kk * band * wo, np.nan, dtype)
    ph = np.zeros(s * ((w + 2 * p + s - 1) // s), dtype)
    for img in range(n):
        for i0 in range(0, ho, band):
            stem.stem_band(x, img, wb, y, 1, k, s, p, ho, wo, i0, min(ho, i0 + band), epilogue.ACT_RELU, consts,
                             tile, ph)
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 1 + m:]).all()  # nothing written outside
    got = y[:, 1:1 + m].reshape(n, m, ho, wo).astype(np.float64)
    want = ops.relu(ops.conv2d(x, wt, b, stride=s, padding=p))
    assert_within_chain_bound(_then_act([_conv_node("stem", "input", stride=s, padding=p)], epilogue.ACT_RELU),
                              {"input": x}, {"stem.weight": wt, "stem.bias": b}, dtype, got, want)


def test_the_plan_runs_as_one_compiled_program():
    weights = random_weights(Config(width=0.5), seed=1)
    plan = engine.get_plan(weights, "float32", (1, 3, 32, 32))
    assert [seg[0] for seg in plan._segments] == ["program"]
    # an activation without a fused epilogue is a Python step between two programs
    weights = random_weights(Config(width=0.5, activation="SiLU"), seed=1)
    plan = engine.get_plan(weights, "float32", (1, 3, 32, 32))
    kinds = [seg[0] for seg in plan._segments]
    assert "python" in kinds and "program" in kinds




@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config, shape", [
    (Config(width=0.75, out_stages=tuple(range(10))), (2, 3, 64, 80)),
    (Config(activation="LeakyReLU", out_stages=(0, 1, 2, 3, 9)), (1, 3, 97, 83)),
    (Config(width=0.5, activation="ReLU6", out_stages=(0, 2, 4)), (1, 3, 30, 6)),  # planes 3 columns wide
    (Config(width=0.5, out_stages=(0, 2)), (1, 3, 40, 2)),  # 1 column: the scratch path for every row
], ids=["batch2", "leaky-odd", "relu6-narrow", "one-column"])
def test_fused_ghost_module_gives_the_bits_of_the_two_ops(monkeypatch, dtype, config, shape):
    """program.OP_GHOST (primary 1x1 conv + its 3x3 depthwise by bands of rows) makes the same GEMM
    calls and computes every depthwise output with the same expression as the GEMM and depthwise
    rows it replaces: the same bits, for any thread count (the threshold lowered so that small
    planes take the fused path too)."""
    weights = random_weights(config, seed=5)
    x = _rng(6).standard_normal(shape).astype(dtype)
    monkeypatch.setattr(recognise, "GHOST_FUSE_MIN_PLANE", 1 << 40)
    want = engine.Plan(weights.graph, weights.tensors, dtype, shape).run(x)
    monkeypatch.setattr(recognise, "GHOST_FUSE_MIN_PLANE", 1)
    plan = engine.Plan(weights.graph, weights.tensors, dtype, shape)
    rows = np.concatenate([seg[1] for seg in plan._segments if seg[0] == "program"])
    assert (rows[:, 0] == program.OP_GHOST).any()
    for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
        with numba_threads(threads):
            got = plan.run(x)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


# --- determinism, caching, dispatch ------------------------------------------------------------


def test_same_bits_for_any_thread_count_and_every_run():
    weights = random_weights(Config(width=0.75, out_stages=tuple(range(10))), seed=8)
    # batch 2 (images over threads) and batch 1 (channels, planes and tiles over threads)
    for shape in [(2, 3, 64, 80), (1, 3, 96, 96)]:
        x = _rng(4).standard_normal(shape).astype(np.float32)
        runs = []
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            with numba_threads(threads):
                runs.append(refghost.run(x, weights, impl="engine"))
                runs.append(refghost.run(x, weights, impl="engine"))
        for other in runs[1:]:
            for name in runs[0]:
                np.testing.assert_array_equal(runs[0][name], other[name])


def _run_fresh_python(script, *args, **env):
    """Run ``script`` in a fresh Python process with ``env`` added to the environment and the tests
    folder as its first argument (its other arguments: ``args``); fail with its stderr if it fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), *map(str, args)],
                          env=dict(os.environ, **env), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


_OVERSUBSCRIBED = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import random_weights
import numba
import refghost
from refghost.arch import Config
assert numba.get_num_threads() == 4
weights = random_weights(Config(width=0.75, out_stages=tuple(range(10))), seed=8)
saved = {}
for shape in [(1, 3, 192, 160), (3, 3, 64, 80)]:
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    runs = [refghost.run(x, weights, impl="engine") for _ in range(5)]
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(runs[0][name], other[name]), name
    saved.update({f"{shape[0]}/{name}": y for name, y in runs[0].items()})
np.savez(sys.argv[2], **saved)
"""


def test_same_bits_with_more_threads_than_cores(tmp_path):
    """Units of work are handed out by atomic counters (refghost.engine.counters), so which thread
    computes what varies from run to run, the more so with more threads than cores (threads are
    descheduled mid-op). Five runs with NUMBA_NUM_THREADS=4 in a fresh process, batch 1 (the ghost
    fusion, the three-phase squeeze-excite) and batch 3 (fewer images than threads: op by op): the
    same bits every time, and the same bits as one thread here (batch 3 image by image)."""
    out = tmp_path / "runs.npz"
    _run_fresh_python(_OVERSUBSCRIBED, out, NUMBA_NUM_THREADS="4")
    got = np.load(out)
    weights = random_weights(Config(width=0.75, out_stages=tuple(range(10))), seed=8)
    for shape in [(1, 3, 192, 160), (3, 3, 64, 80)]:
        x = _rng(4).standard_normal(shape).astype(np.float32)
        with numba_threads(1):
            one_thread = refghost.run(x, weights, impl="engine")
        for name, y in one_thread.items():
            np.testing.assert_array_equal(got[f"{shape[0]}/{name}"], y)


def test_same_bits_when_python_threads_run_the_engine_at_once():
    """refghost.run from several Python threads at once: on one Weights object (one plan, its runs
    serialised by the plan's lock) and on two (two plans whose parallel regions run side by side,
    each with its own work counters). Every run gives the bits of a run alone."""
    from concurrent.futures import ThreadPoolExecutor

    config = Config(width=0.5, out_stages=(4, 9))
    shared, other = random_weights(config, seed=3), random_weights(config, seed=3)
    x = _rng(9).standard_normal((1, 3, 96, 80)).astype(np.float32)
    want = refghost.run(x, random_weights(config, seed=3), impl="engine")
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda w: refghost.run(x, w, impl="engine"), [shared, other] * 6))
    for got in runs:
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config, shape", [
    (Config(out_stages=tuple(range(10))), (3, 3, 64, 80)),
    (Config(width=0.5, activation="LeakyReLU", out_stages=(2, 4, 9)), (4, 3, 97, 83)),
    (Config(width=0.75, activation="ReLU6", out_stages=(9,)), (2, 3, 192, 160)),  # a fused ghost module
], ids=["all-stages", "leaky-odd", "relu6-ghost"])
def test_image_by_image_gives_the_bits_of_op_by_op(dtype, config, shape):
    """A batch run image by image (engine.ImagePlan: whole images per thread through the one-image
    program) and op by op (engine.Plan for the batch): the same bits, for 1 and 2 threads, and its
    buffers are the workers' images', not the batch's."""
    weights = random_weights(config, seed=11)
    x = _rng(12).standard_normal(shape).astype(dtype)
    want = engine.Plan(weights.graph, weights.tensors, dtype, shape).run(x)
    plan = engine.get_plan(weights, dtype, shape)
    assert isinstance(plan, engine.ImagePlan)
    if shape[2] * shape[3] >= 4 * recognise.GHOST_FUSE_MIN_PLANE:
        assert (plan.single._segments[0][1][:, 0] == program.OP_GHOST).any()
    for threads in (1, 2):
        with numba_threads(threads):
            got = plan.run(x)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        assert plan.arena.size <= threads * (plan.single.arena.size + 16)


def test_batches_with_python_steps_run_op_by_op():
    """Activations without a fused epilogue run from Python between program rows: such a plan is
    not one program, so its batches run op by op."""
    weights = random_weights(Config(width=0.5, activation="GELU", out_stages=(4,)), seed=2)
    assert not engine.get_plan(weights, "float32", (1, 3, 32, 32)).runs_images_alone
    assert type(engine.get_plan(weights, "float32", (2, 3, 32, 32))) is engine.Plan


_WORKQUEUE = """
import sys
from concurrent.futures import ThreadPoolExecutor
import numba
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import random_weights
import refghost
from refghost.arch import Config
from refghost.kernels.depthwise import depthwise_conv2d
config = Config(width=0.5, out_stages=(4, 9))
x = np.random.default_rng(9).standard_normal((2, 3, 96, 80)).astype(np.float32)
xd = np.random.default_rng(3).standard_normal((2, 64, 40, 40)).astype(np.float32)
wd = np.random.default_rng(4).standard_normal((64, 1, 3, 3)).astype(np.float32)
want = refghost.run(x, random_weights(config, seed=3), impl="engine")
want_dw = depthwise_conv2d(xd, wd, padding=1)
assert numba.threading_layer() == "workqueue"
weights = [random_weights(config, seed=3) for _ in range(2)]
with ThreadPoolExecutor(4) as pool:
    runs = list(pool.map(lambda w: refghost.run(x, w, impl="engine"), weights * 4))
    dws = list(pool.map(lambda _: depthwise_conv2d(xd, wd, padding=1), range(8)))
for got in runs:
    for name in want:
        assert np.array_equal(got[name], want[name]), name
for got in dws:
    assert np.array_equal(got, want_dw)
"""


def test_python_threads_at_once_with_the_workqueue_threading_layer():
    """Numba's "workqueue" layer (its fallback without OpenMP or TBB) aborts the process when two
    Python threads launch parallel code at once; refghost's launches then take a lock
    (kernels._jit.one_launch_at_a_time). Engine runs and the depthwise kernel from four threads
    at once, in a fresh process on that layer: no abort, the bits of a run alone."""
    _run_fresh_python(_WORKQUEUE, NUMBA_THREADING_LAYER="workqueue")


def test_plan_is_cached_per_dtype_and_shape_and_outputs_are_fresh_arrays():
    weights = random_weights(Config(width=0.5), seed=1)
    x = _rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    first = refghost.run(x, weights)
    kept = {k: v.copy() for k, v in first.items()}
    plan = engine.get_plan(weights, "float32", x.shape)
    refghost.run(x * 2, weights)
    assert engine.get_plan(weights, np.float32, x.shape) is plan
    assert engine.get_plan(weights, "float64", x.shape) is not plan
    for name in kept:  # a later run does not overwrite what an earlier run returned
        np.testing.assert_array_equal(first[name], kept[name])
    for shape in [(1, 3, 32, 32 + i) for i in range(engine.MAX_CACHED_PLANS + 2)]:
        engine.get_plan(weights, "float32", shape)
    assert len(weights.cache.plans) == engine.MAX_CACHED_PLANS


def test_blas_is_single_threaded_during_the_run_and_restored_after():
    from threadpoolctl import threadpool_info

    weights = random_weights(Config(width=0.5), seed=1)
    x = _rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    plan = engine.get_plan(weights, "float32", x.shape)
    before = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    with single_threaded_blas():
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    plan.run(x)
    after = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    assert after == before


def test_intermediates_use_the_interpreter_and_impl_values():
    weights = random_weights(Config(width=0.5), seed=1)
    x = _rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    full = refghost.run(x, weights, intermediates=True)
    assert "blocks.3.0.se.gate" in full and "conv_stem" in full
    for impl in ("fast", "engine", "interpreter", "plain"):
        assert list(refghost.run(x, weights, impl=impl)) == ["blocks.4", "blocks.6", "blocks.9"]
    with pytest.raises(RefghostError, match="intermediates"):
        refghost.run(x, weights, impl="engine", intermediates=True)
    interpreted = refghost.run(x, weights, impl="interpreter")
    for name in interpreted:  # with intermediates, everything comes from the interpreter
        np.testing.assert_array_equal(full[name], interpreted[name])
        np.testing.assert_array_equal(full[name], full[weights.graph.outputs[name]])


def test_declined_graph_falls_back_to_the_interpreter(monkeypatch):
    weights = random_weights(Config(width=0.5), seed=1)
    x = _rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)

    def decline(self, *args, **kwargs):
        raise engine.EngineUnsupported("test")

    monkeypatch.setattr(engine.Plan, "__init__", decline)
    out = refghost.run(x, weights)
    want = refghost.run(x, weights, impl="interpreter")
    for name in want:
        np.testing.assert_array_equal(out[name], want[name])
    with pytest.raises(RefghostError, match="engine cannot run"):
        refghost.run(x, weights, impl="engine")


def test_plan_rejects_a_wrong_input():
    weights = random_weights(Config(width=0.5), seed=1)
    plan = engine.get_plan(weights, "float32", (1, 3, 32, 32))
    with pytest.raises(ValueError, match="plan is for"):
        plan.run(np.zeros((1, 3, 32, 33), np.float32))
