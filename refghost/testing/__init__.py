"""Testing a backend (or refghost itself) against refghost's reference, op by op.

``assert_matches_reference(op, case, actual)`` computes the float64 reference of one op and the
error bound derived by :mod:`refghost.bounds` for an honest implementation in the chosen
precision, and fails with the worst element when ``actual`` breaks it. The cases are small frozen
dataclasses (:class:`ConvCase`, :class:`BatchNormCase`, ...) that need only NumPy.

Hypothesis strategies that generate the cases live in :mod:`refghost.testing.strategies`, which is
not imported here, so ``import refghost.testing`` works without Hypothesis installed::

    from hypothesis import given, settings
    from refghost.testing import strategies as rst, assert_matches_reference

    @settings(deadline=None)  # the reference is timed with your code; its first call compiles
    @given(rst.conv_cases(depthwise=True, kernel_sizes=(3, 5)))
    def test_my_depthwise(case):
        assert_matches_reference("conv2d", case, my_backend_conv(case))

See ``docs/testing.md``.
"""

from ._cases import (ActivationCase, BatchNormCase, BatchNormParams, ConvBNCase, ConvCase, GhostBottleneckCase,
                     GhostBottleneckConfig, GhostModuleCase, GhostModuleConfig, LinearCase, PoolCase,
                     fold_batch_norm, random_params)
from ._reference import OPS, PRECISIONS, assert_matches_reference, reference_and_bound, round_case

__all__ = [
    "assert_matches_reference", "reference_and_bound", "round_case", "fold_batch_norm", "random_params", "OPS",
    "PRECISIONS",
    "ConvCase", "BatchNormParams", "BatchNormCase", "ConvBNCase", "ActivationCase", "PoolCase", "LinearCase",
    "GhostModuleConfig", "GhostModuleCase", "GhostBottleneckConfig", "GhostBottleneckCase",
]
