"""refghost.testing.assert_matches_reference: what it accepts, what it reports, what it catches."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import Phase, find, given, settings

from refghost import ops
from refghost.bounds import UNIT_ROUNDOFF
from refghost.testing import (OPS, ActivationCase, BatchNormCase, BatchNormParams, ConvBNCase, ConvCase, LinearCase,
                              PoolCase, assert_matches_reference, reference_and_bound, round_case)
from refghost.testing import strategies as rst
from refghost.bounds import UNDERFLOW
from refghost.testing._reference import _round_bfloat16


def _conv_case(seed=0, c=4, groups=4, k=3, stride=2, padding=1, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, c, 7, 6)).astype(np.float32)
    w = rng.standard_normal((c, c // groups, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32) if bias else None
    return ConvCase(x, w, b, stride, padding, groups)


def _conv(case):
    return ops.conv2d(case.x, case.w, case.b, stride=case.stride, padding=case.padding, groups=case.groups)


def test_passes_and_returns_the_largest_fraction_of_the_bound():
    case = _conv_case()
    ratio = assert_matches_reference("conv2d", case, _conv(case))
    assert 0 < ratio <= 1


def test_failure_message_names_op_parameters_worst_element_and_count():
    case = _conv_case()
    y = _conv(case)
    y[1, 2, 3, 1] += 0.01
    y[0, 0, 0, 0] += 1e-4
    with pytest.raises(AssertionError) as info:
        assert_matches_reference("conv2d", case, y)
    msg = str(info.value)
    assert msg.startswith("conv2d [x (2, 4, 7, 6) float32, w (4, 1, 3, 3), b (4,), stride=2, padding=1, groups=4")
    assert "depthwise" in msg and "policy float32" in msg
    assert "2 of 96 elements outside the derived bound" in msg
    assert "worst at index (1, 2, 3, 1)" in msg
    ref, bound = reference_and_bound("conv2d", case)
    m = re.search(r"actual (\S+), reference (\S+), \|error\| (\S+), bound (\S+), error/bound (\S+)", msg)
    actual, reference, err, b, ratio = map(float, m.groups())
    assert actual == pytest.approx(y[1, 2, 3, 1], rel=1e-8) and reference == pytest.approx(ref[1, 2, 3, 1], rel=1e-8)
    assert b == pytest.approx(bound[1, 2, 3, 1], rel=1e-2)
    assert ratio == pytest.approx(err / b, rel=1e-2) and ratio > 1000


def test_shape_mismatch_and_nan_fail():
    case = _conv_case()
    y = _conv(case)
    with pytest.raises(AssertionError, match=r"actual has shape \(2, 4, 4\), the reference \(2, 4, 4, 3\)"):
        assert_matches_reference("conv2d", case, y[..., 0])
    y[0, 1, 1, 1] = np.nan
    with pytest.raises(AssertionError, match=r"(?s)1 of 96 elements .* worst at index \(0, 1, 1, 1\): actual nan"):
        assert_matches_reference("conv2d", case, y)


def test_accepts_torch_tensors_of_any_dtype():
    case = _conv_case()
    t = torch.nn.functional.conv2d(*(torch.from_numpy(a) for a in (case.x, case.w, case.b)), stride=2, padding=1,
                                   groups=4)
    assert assert_matches_reference("conv2d", case, t) <= 1
    rounded = round_case(case, "bfloat16")
    tb = torch.nn.functional.conv2d(*(torch.from_numpy(a).bfloat16() for a in (rounded.x, rounded.w, rounded.b)),
                                    stride=2, padding=1, groups=4)
    assert assert_matches_reference("conv2d", rounded, tb, policy="bfloat16") <= 1


@pytest.mark.parametrize("op,case,error", [
    ("conv3d", None, ValueError),
    ("conv2d", PoolCase(np.zeros((1, 1, 2, 2), np.float32)), TypeError),
    ("ReLU", ActivationCase(np.zeros(3, np.float32), "GELU"), ValueError),
    ("PReLU", ActivationCase(np.zeros(3, np.float32), "PReLU"), ValueError),
    ("activation", ActivationCase(np.zeros(3, np.float32), "Swish"), ValueError),
])
def test_bad_op_or_case(op, case, error):
    with pytest.raises(error):
        assert_matches_reference(op, case, np.zeros(3))


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy must be one of"):
        assert_matches_reference("conv2d", _conv_case(), _conv(_conv_case()), policy="int8")


def test_every_op_has_a_case_type_and_passes_its_own_float64_reference():
    expected = {"conv2d", "batch_norm", "conv_bn", "hard_sigmoid", "global_avg_pool", "linear", "ghost_module",
                "ghost_bottleneck", "activation", *ops.ACTIVATIONS}
    assert set(OPS) == expected


@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
def test_inputs_must_be_representable_in_the_policy(policy):
    case = _conv_case()
    with pytest.raises(ValueError, match=rf"not representable in {policy}.*round_case"):
        assert_matches_reference("conv2d", case, _conv(case), policy=policy)
    rounded = round_case(case, policy)
    exact, _ = reference_and_bound("conv2d", rounded, policy=policy)
    assert assert_matches_reference("conv2d", rounded, exact, policy=policy) == 0


def test_round_case_bfloat16_matches_torch():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 10.0 ** np.arange(-20, 20, 0.004)[:10_000]
    x = np.concatenate([x, np.float32([0, -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.0, 1e-40, 65504, 3.4e38])])
    ours = _round_bfloat16(x)
    theirs = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert (ours.view(np.uint32) & 0xFFFF == 0).all()


def test_round_case_rounds_nested_arrays():
    conv = _conv_case()
    bn = BatchNormParams(*(np.full(4, 1.1, np.float32) for _ in range(4)))
    case = round_case(ConvBNCase(conv, bn), "float16")
    assert case.conv.x.dtype == case.conv.w.dtype == case.bn.running_var.dtype == np.float16
    assert case.bn.eps == bn.eps and case.conv.stride == conv.stride


def test_subnormal_products_underflow_within_the_bound():
    """x and w products below the smallest normal round absolutely; the bound has a term for it."""
    x = np.full((1, 1, 3, 3), 1e-40, np.float32)
    w = np.full((1, 1, 3, 3), 0.3, np.float32)
    case = ConvCase(x, w, None, 1, 0, 1)
    y = _conv(case)  # 9 rounded subnormal products
    ref, bound = reference_and_bound("conv2d", case)
    assert abs(float(y[0, 0, 0, 0]) - ref[0, 0, 0, 0]) > 100 * float(ref[0, 0, 0, 0]) * UNIT_ROUNDOFF["float32"]
    assert bound[0, 0, 0, 0] >= 19 * UNDERFLOW["float32"]
    assert_matches_reference("conv2d", case, y)
    with torch.no_grad():
        assert_matches_reference("conv2d", case, torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)))


def test_conv_bn_bound_covers_unfolded_and_fused_and_no_more_than_needed():
    rng = np.random.default_rng(3)
    conv = _conv_case(groups=1, k=3)
    bn = BatchNormParams(rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32),
                         rng.normal(0, 1, 4).astype(np.float32), np.float32([1.0, 0.0, 1e-8, 4.0]))
    case = ConvBNCase(conv, bn)
    ref, bound = reference_and_bound("conv_bn", case)
    _, conv_bound = reference_and_bound("conv2d", conv)
    alpha = np.abs(bn.coefficients()[0]).astype(np.float64)[None, :, None, None]
    assert (bound >= alpha * conv_bound * (1 - 1e-6)).all()  # at least the conv's, carried through BN
    assert (bound <= 3 * alpha * conv_bound + 1e-4).all()  # and not wildly more
    wf, bf = case.folded()
    assert_matches_reference("conv_bn", case, ops.conv2d(conv.x, wf, bf, stride=conv.stride, padding=conv.padding))


def test_linear_and_pool_and_activation_cases():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 1280)).astype(np.float32)
    w = (rng.standard_normal((5, 1280)) / 36).astype(np.float32)
    for b in (None, rng.standard_normal(5).astype(np.float32)):
        assert_matches_reference("linear", LinearCase(x, w, b), ops.linear(x, w, b))
    xp = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    assert_matches_reference("global_avg_pool", PoolCase(xp), ops.global_avg_pool(xp))
    case = ActivationCase(xp, "PReLU", np.float32([0.25]))
    assert_matches_reference("activation", case, ops.prelu(xp, case.weight))
    assert_matches_reference("PReLU", case, ops.prelu(xp, case.weight))


def test_batch_norm_with_zero_variance():
    x = np.float32([[[[1.0, -2.0]], [[3.0, 0.5]]]])
    bn = BatchNormParams(np.float32([1.0, -0.5]), np.float32([0.1, 0.2]), np.float32([0.3, -0.4]),
                         np.float32([0.0, 0.0]))
    case = BatchNormCase(x, bn)
    y = ops.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    assert_matches_reference("batch_norm", case, y)


_SHRINK = settings(database=None, max_examples=500, derandomize=True, phases=[Phase.generate, Phase.shrink])


def test_a_buggy_backend_shrinks_to_a_minimal_failing_case():
    """A depthwise conv that forgets the last kernel column: Hypothesis reports a tiny case."""

    def buggy(case):
        w = case.w.copy()
        w[..., -1] = 0
        return _conv(ConvCase(case.x, w, case.b, case.stride, case.padding, case.groups))

    def fails(case):
        try:
            assert_matches_reference("conv2d", case, buggy(case))
        except AssertionError:
            return True
        return False

    case = find(rst.conv_cases(depthwise=True, kernel_sizes=(3, 5)), fails, settings=_SHRINK)
    assert case.x.shape[:2] == (1, 1) and case.w.shape == (1, 1, 3, 3) and case.b is None
    assert case.stride == 1 and case.padding == 0 and case.x.shape[2:] == (3, 3)
    # the minimal case is small enough to print exactly: a single nonzero product matters
    assert "array(" in repr(case)


@given(rst.conv_cases(dtype=np.float64))
def test_float64_policy_accepts_the_reference_itself(case):
    y, _ = reference_and_bound("conv2d", case, policy="float64")
    assert assert_matches_reference("conv2d", case, _conv(case), policy="float64") <= 1
    assert assert_matches_reference("conv2d", case, y, policy="float64") == 0
