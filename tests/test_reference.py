"""refghost against an independent PyTorch GhostNet (tests/torch_ghostnet.py), layer by layer.

Three claims, each with a tolerance that comes from the arithmetic (refghost/bounds.py,
docs/tolerances.md), never a hand-picked number:

1. float64: refghost and PyTorch, both in float64, agree to 1e-10 of each tensor's largest
   magnitude. Both sum the same float64 products in different orders; a dot product of n <= 1441
   terms in float64 is off by at most n * 2^-53 ~ 1.6e-13 of the sum of |terms|, and an honest
   network stays orders of magnitude inside 1e-10 (a wrong op, constant or order is O(1)).
2. float32, isolated: every layer PyTorch computes in float32, given PyTorch's own float32 input
   to that layer, lies within the worst-case rounding bound of the float64 op (any summation
   order): each refghost op is the op PyTorch computes.
3. float32, accumulated: PyTorch's and refghost's float32 outputs of every layer both lie within
   the probabilistic bound (8 standard deviations of the propagated rounding error) of the
   float64 oracle, so they lie within twice that of each other.
"""

import numpy as np
import pytest
import torch
import torch_ghostnet as tg

import refghost
from refghost.arch import Config
from refghost.bounds import error_bounds
from refghost.weights import from_tensors

# (arch, width, activation, out_stages, (N, H, W)); every width, activation and both archs.
CASES = [
    ("nanodet", 1.0, "ReLU", (4, 6, 9), (1, 64, 64)),
    ("nanodet", 0.5, "LeakyReLU", (0, 4, 9), (2, 33, 47)),
    ("nanodet", 0.75, "GELU", (6,), (1, 40, 40)),
    ("nanodet", 1.3, "HardSwish", (2, 5, 8), (1, 35, 29)),
    ("nanodet", 1.0, "ReLU6", (9,), (1, 32, 32)),
    ("nanodet", 0.5, "SELU", (4, 6, 9), (1, 33, 47)),
    ("nanodet", 0.5, "ELU", (1, 3, 7), (2, 24, 40)),
    ("nanodet", 0.75, "PReLU", (4, 6, 9), (1, 37, 31)),
    ("nanodet", 1.0, "SiLU", tuple(range(10)), (1, 48, 48)),
    ("ghostnet", 1.0, "ReLU", (), (2, 64, 64)),
]


def _ids(case):
    arch, width, act, stages, shape = case
    return f"{arch}-{width}-{act}-{'_'.join(map(str, stages))}-{'x'.join(map(str, shape))}"


@pytest.fixture(scope="module", params=CASES, ids=_ids)
def case(request):
    """The torch model, the same weights as refghost Weights, an input, and both float32 runs."""
    arch, width, activation, stages, (n, h, w) = request.param
    num_classes = 10 if arch == "ghostnet" else 0
    model = tg.randomize(tg.build(arch, width, activation, stages, num_classes=num_classes or 1000), seed=7)
    config = Config(arch=arch, width=width, activation=activation, out_stages=stages or (4, 6, 9),
                    num_classes=num_classes)
    weights = from_tensors(tg.state_dict_numpy(model), config)
    x = np.random.default_rng(11).standard_normal((n, 3, h, w)).astype(np.float32)
    torch_out, torch_layers = tg.capture(model, x)
    torch_layers = {k: v.numpy() for k, v in torch_layers.items()}
    torch_layers.update(tg.se_gates(torch_layers))  # the gate is a function call: no hook sees it
    ours = refghost.run(x, weights, intermediates=True)
    return dict(model=model, weights=weights, x=x, torch_out=torch_out, torch_layers=torch_layers, ours=ours)


def _torch_outputs(weights, torch_out):
    names = list(weights.graph.outputs)
    tensors = [torch_out] if isinstance(torch_out, torch.Tensor) else list(torch_out)
    assert len(tensors) == len(names)
    return {name: t.numpy() for name, t in zip(names, tensors)}


def test_every_refghost_layer_is_a_pytorch_module(case):
    nodes = [n.name for n in case["weights"].graph.nodes]
    assert list(case["ours"])[: 3] == ["conv_stem", "bn1", "act1"]
    missing = [name for name in nodes if name not in case["torch_layers"]]
    assert missing == [], missing[:5]


def test_outputs_shapes_and_order(case):
    weights, ours = case["weights"], case["ours"]
    torch_outputs = _torch_outputs(weights, case["torch_out"])
    out = refghost.run(case["x"], weights)
    assert list(out) == list(torch_outputs)  # ascending stage order, or ["classifier"]
    nodes = weights.graph.outputs
    for name, t in torch_outputs.items():
        assert out[name].shape == t.shape and out[name].dtype == np.float32
        assert np.array_equal(ours[name], ours[nodes[name]])  # an output is its layer's tensor


def test_float64_matches_pytorch_float64(case):
    model64 = case["model"].double()
    try:
        torch_out, torch_layers = tg.capture(model64, case["x"].astype(np.float64))
    finally:
        case["model"].float()
    ours = refghost.run(case["x"], case["weights"], dtype="float64", intermediates=True)
    for name, t in list(torch_layers.items()) + list(_torch_outputs(case["weights"], torch_out).items()):
        if name not in ours:
            continue
        t = t.numpy() if isinstance(t, torch.Tensor) else t
        assert ours[name].dtype == np.float64
        scale = np.abs(t).max()
        assert np.abs(ours[name] - t).max() <= 1e-10 * scale, name


def test_float32_each_pytorch_layer_within_its_isolated_bound(case):
    weights, x = case["weights"], case["x"]
    values, bounds = error_bounds(weights.graph, weights.params("float64"), x.astype(np.float64),
                                  model="worst", isolated_from=case["torch_layers"])
    for name, bound in bounds.items():
        err = np.abs(case["torch_layers"][name] - values[name])
        assert (err <= bound).all(), f"{name}: error {err.max():.3g} > bound at {np.argmax(err - bound)}"


def test_float32_both_within_accumulated_bound_of_oracle(case):
    weights, x = case["weights"], case["x"]
    values, bounds = error_bounds(weights.graph, weights.params("float64"), x.astype(np.float64))
    for who in ("ours", "torch_layers"):
        for name, bound in bounds.items():
            err = np.abs(case[who][name] - values[name])
            assert (err <= bound).all(), f"{who} {name}: error {err.max():.3g} exceeds its bound"
