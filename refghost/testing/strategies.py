"""Hypothesis strategies for GhostNet's ops, blocks and configurations.

Requires the hypothesis package to be installed (``pip install hypothesis``); ``refghost`` and
``refghost.testing`` do not import it. Use the module under a short alias::

    >>> from refghost.testing import strategies as rst
    >>> rst.conv_cases(depthwise=True, kernel_sizes=(3, 5))  # doctest: +SKIP

Conventions (those of ``hypothesis.extra.numpy``):

* names are nouns for what is generated; every option is keyword-only;
* every option takes a value or a strategy (``kernel_sizes=3``, ``kernel_sizes=(3, 5)`` to choose
  among, ``kernel_sizes=st.sampled_from([3, 5])``); a value is checked when the strategy is built
  and a bad one raises :class:`hypothesis.errors.InvalidArgument` there; a drawn value is checked
  when drawn;
* defaults are small: a few channels, sides up to ~10, batch 1 or 2;
* arrays are float32 unless ``dtype`` says otherwise (float16, float32, float64);
* tensors whose shape is drawn (inputs, weights) come from a drawn seed,
  ``np.random.default_rng(seed)``, plus a few drawn "extreme" elements written in: a seed means the
  same thing whatever the shape, so the shrinker can shrink the shape and keep the failure, and
  the minimal case prints in full (its arrays are small); per-channel vectors (biases, BatchNorm
  parameters, PReLU's slope) of up to :data:`SMALL_ARRAY` elements are drawn element by element,
  so they shrink to simple numbers.

Extremes (``extremes=True``, the default for op inputs): exact zeros of both signs, the
hard-sigmoid/hard-swish knees ±3 and their float neighbours, the ReLU6 knee ±6, ±1e4 and
subnormals (the smallest, and half the smallest normal). Weights and BatchNorm parameters are
normal numbers (subnormals flushed to zero); BatchNorm variances include tiny ones (0, 1e-12,
1e-8, 1e-6) unless ``tiny_variances=False``.

Dilation: refghost's ops (and GhostNet) have none; ``conv_cases(dilation=...)`` accepts only 1.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

from .. import ops
from ..arch import ARCHITECTURES, NUM_STAGES, Config
from ..errors import RefghostError
from ._cases import (ActivationCase, BatchNormCase, BatchNormParams, ConvBNCase, ConvCase, GhostBottleneckCase,
                     GhostBottleneckConfig, GhostModuleCase, GhostModuleConfig, LinearCase, PoolCase, random_params)

__all__ = [
    "input_arrays",
    "conv_cases",
    "batch_norm_params",
    "batch_norm_cases",
    "conv_bn_cases",
    "activation_names",
    "activation_cases",
    "global_avg_pool_cases",
    "linear_cases",
    "ghost_module_configs",
    "ghost_module_cases",
    "ghost_bottleneck_configs",
    "ghost_bottleneck_cases",
    "ghostnet_configs",
    "extreme_values",
    "SMALL_ARRAY",
]

#: Per-channel vectors with at most this many elements are drawn element by element; larger ones,
#: and every tensor whose shape is drawn, from a seed.
SMALL_ARRAY = 16
#: dtypes the strategies generate.
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: BatchNorm variances that make 1/sqrt(var + eps) large (eps dominates).
TINY_VARIANCES = (0.0, 1e-12, 1e-8, 1e-6)
_MAX_EXTREMES = 8
_SEEDS = st.integers(0, 2 ** 32 - 1)


# --- argument checking ------------------------------------------------------------------------


def _fail(message):
    raise InvalidArgument(message)


def _is_strategy(value):
    return isinstance(value, st.SearchStrategy)


def _int(name, value, min_value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < min_value:
        _fail(f"{name}={value!r} must be an int >= {min_value}")


def _pos(name, value):
    _int(name, value, 1)


def _nonneg(name, value):
    _int(name, value, 0)


def _even(name, value):
    _int(name, value, 2)
    if value % 2:
        _fail(f"{name}={value!r} must be even (a GhostModule concatenates two equal halves)")


def _bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        _fail(f"{name}={value!r} must be a bool")


def _positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        _fail(f"{name}={value!r} must be a finite positive number")


def _activation(name, value):
    if value not in ops.ACTIVATIONS:
        _fail(f"{name}={value!r} is not an activation; expected one of {', '.join(ops.ACTIVATIONS)}")


def _activation_or_gate(name, value):
    if value != "hard_sigmoid" and value not in ops.ACTIVATIONS:
        _fail(f"{name}={value!r} is not an activation; expected one of "
              f"{', '.join(ops.ACTIVATIONS)} or 'hard_sigmoid'")


def _dtype_value(name, value):
    try:
        dt = np.dtype(value)
    except TypeError:
        _fail(f"{name}={value!r} is not a dtype")
    if dt not in DTYPES:
        _fail(f"{name}={value!r} must be one of float16, float32, float64 (bfloat16: draw float32 and use "
              f"refghost.testing.round_case(case, 'bfloat16'))")
    return dt


def _checked(name, value, check):
    """``value`` as a strategy: a strategy is checked per drawn value, a value now."""
    if _is_strategy(value):
        def check_drawn(v):
            check(name, v)
            return v
        return value.map(check_drawn)
    check(name, value)
    return st.just(value)


def _option(name, value, check, default):
    """None -> ``default`` (a strategy); a value or a strategy -> :func:`_checked`."""
    return default if value is None else _checked(name, value, check)


def _choices(name, value, check):
    """A value, a non-empty tuple/list of values to choose among, or a strategy."""
    if isinstance(value, (tuple, list, range)):
        if len(value) == 0:
            _fail(f"{name} must not be empty")
        for v in value:
            check(name, v)
        return st.sampled_from(tuple(value))
    return _checked(name, value, check)


def _dtype(dtype):
    if _is_strategy(dtype):
        return dtype.map(lambda v: _dtype_value("dtype", v))
    return st.just(_dtype_value("dtype", dtype))


def _values(value):
    """The plain values an option may take, or None if it is a strategy (unknown until drawn)."""
    if _is_strategy(value):
        return None
    return tuple(value) if isinstance(value, (tuple, list, range)) else (value,)


# --- arrays ----------------------------------------------------------------------------------


def extreme_values(dtype=np.float32):
    """The extreme input values the strategies mix in, exactly representable in ``dtype``.

    ``0, -0, ±3 and their neighbours (hard-sigmoid knees), ±6 (ReLU6), ±1e4, ±smallest subnormal,
    ±(smallest normal / 2)`` (a subnormal).
    """
    dt = _dtype_value("dtype", dtype)
    t = dt.type
    info = np.finfo(dt)
    values = [0.0, -0.0, 3.0, -3.0, 6.0, -6.0, 1e4, -1e4]
    values += [float(np.nextafter(t(3), t(4))), float(np.nextafter(t(3), t(2))),
               float(np.nextafter(t(-3), t(-4))), float(np.nextafter(t(-3), t(-2)))]
    for sub in (float(info.smallest_subnormal), float(info.tiny) / 2):
        values += [sub, -sub]
    return tuple(float(t(v)) for v in values)


def _flush_subnormals(a):
    tiny = np.finfo(a.dtype).tiny
    return np.where(np.abs(a) < tiny, a.dtype.type(0), a)


def _draw_array(draw, shape, dtype, *, sample, low=None, high=None, specials=(), flush=False, direct=False):
    """An array of ``shape``: ``sample(rng, shape)`` from a drawn seed, with up to 8 drawn
    ``specials`` written in; or, for a ``direct`` array (a per-channel vector) of at most
    SMALL_ARRAY elements, elements drawn one by one in [low, high] (or among ``specials``).

    Tensors whose shape is drawn (inputs, weights) always come from a seed: a seed means the same
    thing whatever the shape, so the shrinker can make the shape smaller and keep the failure."""
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape, dtype=np.int64))
    if direct and size <= SMALL_ARRAY:
        elements = st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)
        if specials:
            elements = st.one_of(elements, st.sampled_from(specials))
        a = draw(hnp.arrays(np.float64, shape, elements=elements))
        # values that would become subnormal in dtype are flushed, unless drawn as extremes
        below = (np.abs(a) < np.finfo(dtype).tiny) & ~np.isin(a, specials)
        a = np.where(below, np.copysign(0.0, a), a)
    else:
        a = np.asarray(sample(np.random.default_rng(draw(_SEEDS)), shape), dtype=np.float64)
        if specials:
            edits = draw(st.lists(st.tuples(st.integers(0, size - 1), st.sampled_from(specials)),
                                  max_size=min(size, _MAX_EXTREMES)))
            flat = a.reshape(-1)
            for i, v in edits:
                flat[i] = v
    a = a.astype(dtype)
    return _flush_subnormals(a) if flush else a


def _input(draw, shape, dtype, scale, extremes):
    return _draw_array(draw, shape, dtype, sample=lambda rng, s: scale * rng.standard_normal(s),
                       specials=extreme_values(dtype) if extremes else ())


def _shape_value(name, value):
    if not isinstance(value, tuple) or not value:
        _fail(f"{name}={value!r} must be a non-empty tuple of ints")
    for i, s in enumerate(value):
        _pos(f"{name}[{i}]", s)


@st.composite
def _input_arrays(draw, shape, dtype, scale, extremes):
    return _input(draw, draw(shape), draw(dtype), draw(scale), draw(extremes))


def input_arrays(shape, *, dtype=np.float32, scale=1.0, extremes=True):
    """Input tensors: ``N(0, scale^2)`` values from a drawn seed, plus up to 8 drawn extremes.

    * ``shape``: tuple of positive ints, or a strategy of them (e.g. ``hnp.array_shapes()``)
    * ``dtype``: float16, float32 (default) or float64
    * ``scale``: positive float, the standard deviation of the realistic part (default 1)
    * ``extremes``: bool, mix in :func:`extreme_values` (default True)

    .. code-block:: pycon

        >>> rst.input_arrays((1, 3, 8, 8)).example().shape  # doctest: +SKIP
        (1, 3, 8, 8)
    """
    return _input_arrays(_checked("shape", shape, _shape_value), _dtype(dtype),
                         _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


def _conv_weight(draw, shape, dtype):
    std = 1.0 / math.sqrt(int(np.prod(shape[1:])))
    return _draw_array(draw, shape, dtype, sample=lambda rng, s: std * rng.standard_normal(s), flush=True)


def _bias(draw, shape, dtype):
    return _draw_array(draw, shape, dtype, sample=lambda rng, s: 0.5 * rng.standard_normal(s),
                       low=-1.0, high=1.0, flush=True, direct=True)


def _nchw(draw, batch_size, channels, height, width):
    return (draw(batch_size), draw(channels), draw(height), draw(width))


_BATCH = st.integers(1, 2)
_CHANNELS = st.integers(1, 4)
_SIDE = st.integers(1, 6)


# --- convolution -----------------------------------------------------------------------------


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _padding_value(name, value):
    if value != "same":
        _nonneg(name, value)


def _paddings_for(paddings, k):
    """The padding choices for kernel k (None: 0..(k-1)//2; "same": (k-1)//2)."""
    if paddings is None:
        return tuple(range((k - 1) // 2 + 1))
    return tuple((k - 1) // 2 if p == "same" else p for p in paddings)


@st.composite
def _conv_geometry(draw, batch_size, in_channels, out_channels, groups, depthwise, kernel_sizes, strides,
                   paddings, height, width, bias, dtype):
    """(x shape, w shape, bias?, stride, padding, groups, dtype), all consistent."""
    dt = draw(dtype)
    k, s = draw(kernel_sizes), draw(strides)
    p_choice = draw(paddings)
    p = (k - 1) // 2 if p_choice == "same" else (draw(st.integers(0, (k - 1) // 2)) if p_choice is None else p_choice)
    dw = draw(depthwise)  # True: depthwise; False: dense unless groups given; None: any grouping
    if dw is True:
        if groups is not None:
            _fail("give groups or depthwise=True, not both (depthwise means groups == in_channels)")
        o = draw(out_channels) if out_channels is not None else None
        if in_channels is not None:
            c = draw(in_channels)
        else:  # o = c, or a multiple of it when out_channels is given
            c = draw(st.integers(1, 8)) if o is None else draw(st.sampled_from(_divisors(o)[::-1]))
        o = c if o is None else o
        if o % c:
            _fail(f"depthwise: out_channels={o} must be a multiple of in_channels={c}")
        g = c
    else:
        c = draw(in_channels) if in_channels is not None else None
        o = draw(out_channels) if out_channels is not None else None
        if groups is not None:
            g = draw(groups)
        elif dw is False:
            g = 1
        elif c is None and o is None:
            g = draw(st.integers(1, 4))
        else:  # a divisor of the given channel count(s); 1 first, so it shrinks to dense
            g = draw(st.sampled_from(_divisors(math.gcd(c or 0, o or 0))))
        c = g * draw(_CHANNELS) if c is None else c
        o = g * draw(_CHANNELS) if o is None else o
        if c % g or o % g:
            _fail(f"groups={g} must divide in_channels={c} and out_channels={o}")
    lo = max(1, k - 2 * p)
    h = draw(height) if height is not None else draw(st.integers(lo, lo + 6))
    w = draw(width) if width is not None else draw(st.integers(lo, lo + 6))
    assume(h + 2 * p >= k and w + 2 * p >= k)  # only a user-fixed size can be too small
    n = draw(batch_size)
    return (n, c, h, w), (o, c // g, k, k), draw(bias), s, p, g, dt


def _conv_strategy(batch_size, in_channels, out_channels, groups, depthwise, kernel_sizes, strides, paddings,
                   height, width, bias, dilation, dtype):
    """Checks the conv options eagerly and returns the geometry strategy."""
    if _is_strategy(dilation) or dilation not in (1, (1, 1)):
        _fail(f"dilation={dilation!r}: refghost's ops (and GhostNet) have no dilation; only 1 is supported")
    if depthwise is None:  # any grouping, with forced depthwise half the time (GhostNet's commonest)
        dw = st.sampled_from((None, True)) if groups is None else st.just(None)
    else:
        dw = _checked("depthwise", depthwise, _bool)
    if depthwise is True and groups is not None:
        _fail("give groups or depthwise=True, not both (depthwise means groups == in_channels)")
    ks = _choices("kernel_sizes", kernel_sizes, _pos)
    ss = _choices("strides", strides, _pos)
    ps = st.none() if paddings is None else _choices("paddings", paddings, _padding_value)
    cin = None if in_channels is None else _checked("in_channels", in_channels, _pos)
    cout = None if out_channels is None else _checked("out_channels", out_channels, _pos)
    g = None if groups is None else _checked("groups", groups, _pos)
    # Eager consistency checks on plain values.
    cv, ov, gv = _values(in_channels), _values(out_channels), _values(groups)
    if cv and gv and cv[0] is not None and gv[0] is not None and cv[0] % gv[0]:
        _fail(f"groups={gv[0]} does not divide in_channels={cv[0]}")
    if ov and gv and ov[0] is not None and gv[0] is not None and ov[0] % gv[0]:
        _fail(f"groups={gv[0]} does not divide out_channels={ov[0]}")
    if depthwise is True and cv and ov and cv[0] is not None and ov[0] is not None and ov[0] % cv[0]:
        _fail(f"depthwise: out_channels={ov[0]} must be a multiple of in_channels={cv[0]}")
    hs = None if height is None else _checked("height", height, _pos)
    ws = None if width is None else _checked("width", width, _pos)
    kv, pv = _values(kernel_sizes), None if paddings is None else _values(paddings)
    for side_name, side in (("height", height), ("width", width)):
        sv = _values(side) if side is not None else None
        if sv and kv and (paddings is None or pv):
            if not any(sv[0] + 2 * p >= k for k in kv for p in _paddings_for(pv, k)):
                _fail(f"{side_name}={sv[0]} is too small for every kernel size in {kv} with its paddings")
    return _conv_geometry(_option("batch_size", batch_size, _pos, _BATCH), cin, cout, g, dw, ks, ss, ps,
                          hs, ws, _option("bias", bias, _bool, st.booleans()), _dtype(dtype))


@st.composite
def _conv_case(draw, geometry, scale, extremes):
    xs, ws, has_bias, s, p, g, dt = draw(geometry)
    x = _input(draw, xs, dt, draw(scale), draw(extremes))
    w = _conv_weight(draw, ws, dt)
    b = _bias(draw, (ws[0],), dt) if has_bias else None
    return ConvCase(x, w, b, int(s), int(p), int(g))


def conv_cases(*, batch_size=None, in_channels=None, out_channels=None, groups=None, depthwise=None,
               kernel_sizes=(1, 3, 5), strides=(1, 2), paddings=None, height=None, width=None, bias=None,
               dilation=1, dtype=np.float32, scale=1.0, extremes=True):
    """:class:`~refghost.testing.ConvCase`: a 2-D convolution with consistent shapes.

    * ``batch_size``: int >= 1 (default 1 or 2)
    * ``in_channels``, ``out_channels``: int >= 1 (default: drawn, up to 16, multiples of ``groups``)
    * ``groups``: int dividing both (default: drawn among dense, grouped and depthwise)
    * ``depthwise``: bool; True forces ``groups == in_channels`` (and ``out_channels ==
      in_channels`` unless given as a multiple); False gives ``groups=1`` unless ``groups`` is
      given; default: either
    * ``kernel_sizes``: int or choices (default ``(1, 3, 5)``), square kernels
    * ``strides``: int or choices (default ``(1, 2)``)
    * ``paddings``: int, choices or ``"same"`` (``(k-1)//2``, GhostNet's); default: 0..(k-1)//2
    * ``height``, ``width``: input sides (default: from the smallest valid up to 6 more)
    * ``bias``: bool (default: either)
    * ``dilation``: 1 only (refghost's ops have no dilation); anything else is InvalidArgument
    * ``dtype``: float16, float32 (default), float64
    * ``scale``, ``extremes``: the input's values, as in :func:`input_arrays`

    Weights are N(0, 1/fan_in), biases N(0, 0.25).

    .. code-block:: pycon

        >>> case = rst.conv_cases(depthwise=True, kernel_sizes=(3, 5)).example()  # doctest: +SKIP
        >>> case.groups == case.x.shape[1] == case.w.shape[0]  # doctest: +SKIP
        True
    """
    geometry = _conv_strategy(batch_size, in_channels, out_channels, groups, depthwise, kernel_sizes, strides,
                              paddings, height, width, bias, dilation, dtype)
    return _conv_case(geometry, _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


# --- batch norm ------------------------------------------------------------------------------


def _bn_params(draw, c, dt, eps, tiny_variances):
    shape = (c,)
    weight = _draw_array(draw, shape, dt, sample=lambda rng, s: rng.uniform(-0.5, 2.0, s), low=-2.0, high=2.0,
                         flush=True, direct=True)
    bias = _draw_array(draw, shape, dt, sample=lambda rng, s: 0.5 * rng.standard_normal(s), low=-2.0, high=2.0,
                       flush=True, direct=True)
    mean = _draw_array(draw, shape, dt, sample=lambda rng, s: rng.standard_normal(s), low=-4.0, high=4.0,
                       flush=True, direct=True)
    var = _draw_array(draw, shape, np.float64, sample=lambda rng, s: 10.0 ** rng.uniform(-3, 1, s),
                      low=2.0 ** -10, high=16.0, direct=True)
    if tiny_variances:
        for i, v in draw(st.lists(st.tuples(st.integers(0, c - 1), st.sampled_from(TINY_VARIANCES)),
                                  max_size=min(c, 4))):
            var[i] = v
    var = _flush_subnormals(var.astype(dt))
    return BatchNormParams(weight, bias, mean, var, float(eps))


@st.composite
def _batch_norm_params(draw, channels, dtype, eps, tiny_variances):
    return _bn_params(draw, draw(channels), draw(dtype), draw(eps), draw(tiny_variances))


def batch_norm_params(channels, *, dtype=np.float32, eps=ops.BN_EPS, tiny_variances=True):
    """:class:`~refghost.testing.BatchNormParams` for ``channels`` channels (eval mode).

    * ``channels``: int >= 1 or a strategy
    * ``dtype``: float16, float32 (default), float64
    * ``eps``: positive float (default 1e-5, PyTorch's)
    * ``tiny_variances``: bool (default True): some running variances are 0, 1e-12, 1e-8 or 1e-6,
      so ``eps`` dominates ``var + eps``

    gamma U(-0.5, 2), beta N(0, 0.25), running mean N(0, 1), running variance log-uniform in
    [1e-3, 10] (elementwise draws in similar ranges for small channel counts).

    .. code-block:: pycon

        >>> rst.batch_norm_params(8).example().running_var.shape  # doctest: +SKIP
        (8,)
    """
    return _batch_norm_params(_checked("channels", channels, _pos), _dtype(dtype),
                              _checked("eps", eps, _positive_float), _checked("tiny_variances", tiny_variances, _bool))


@st.composite
def _batch_norm_case(draw, batch_size, channels, height, width, dtype, eps, tiny_variances, scale, extremes):
    shape = _nchw(draw, batch_size, channels, height, width)
    dt = draw(dtype)
    x = _input(draw, shape, dt, draw(scale), draw(extremes))
    return BatchNormCase(x, _bn_params(draw, shape[1], dt, draw(eps), draw(tiny_variances)))


def batch_norm_cases(*, batch_size=None, channels=None, height=None, width=None, dtype=np.float32,
                     eps=ops.BN_EPS, tiny_variances=True, scale=1.0, extremes=True):
    """:class:`~refghost.testing.BatchNormCase`: an input (N, C, H, W) and eval-mode BN parameters.

    * ``batch_size`` (default 1-2), ``channels`` (1-4), ``height``, ``width`` (1-6): ints >= 1
    * ``dtype``, ``eps``, ``tiny_variances``: as in :func:`batch_norm_params`
    * ``scale``, ``extremes``: the input's values, as in :func:`input_arrays`

    .. code-block:: pycon

        >>> case = rst.batch_norm_cases(channels=3).example()  # doctest: +SKIP
        >>> case.x.shape[1], case.bn.weight.shape  # doctest: +SKIP
        (3, (3,))
    """
    return _batch_norm_case(_option("batch_size", batch_size, _pos, _BATCH),
                            _option("channels", channels, _pos, _CHANNELS),
                            _option("height", height, _pos, _SIDE), _option("width", width, _pos, _SIDE),
                            _dtype(dtype), _checked("eps", eps, _positive_float),
                            _checked("tiny_variances", tiny_variances, _bool),
                            _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


@st.composite
def _conv_bn_case(draw, conv, eps, tiny_variances):
    c = draw(conv)
    return ConvBNCase(c, _bn_params(draw, c.w.shape[0], c.x.dtype, draw(eps), draw(tiny_variances)))


def conv_bn_cases(*, eps=ops.BN_EPS, tiny_variances=True, **conv_options):
    """:class:`~refghost.testing.ConvBNCase`: a convolution and the BatchNorm after it.

    * every option of :func:`conv_cases` (``depthwise``, ``kernel_sizes``, ``dtype``, ...)
    * ``eps``, ``tiny_variances``: as in :func:`batch_norm_params`

    .. code-block:: pycon

        >>> case = rst.conv_bn_cases(kernel_sizes=1).example()  # doctest: +SKIP
        >>> case.bn.weight.shape == (case.conv.w.shape[0],)  # doctest: +SKIP
        True
    """
    return _conv_bn_case(conv_cases(**conv_options), _checked("eps", eps, _positive_float),
                         _checked("tiny_variances", tiny_variances, _bool))


# --- activations, pooling, linear --------------------------------------------------------------


def activation_names(*, exclude=()):
    """Names of GhostNet's activations (:data:`refghost.ops.ACTIVATIONS`, NanoDet's spelling).

    * ``exclude``: names to leave out (e.g. ``("PReLU",)`` for a backend without it)

    .. code-block:: pycon

        >>> rst.activation_names(exclude=("PReLU", "GELU")).example()  # doctest: +SKIP
        'ReLU'
    """
    if isinstance(exclude, str) or not isinstance(exclude, (tuple, list, set, frozenset)):
        _fail(f"exclude={exclude!r} must be a collection of activation names")
    for name in exclude:
        _activation("exclude", name)
    names = [n for n in ops.ACTIVATIONS if n not in set(exclude)]
    if not names:
        _fail("exclude leaves no activation")
    return st.sampled_from(names)


@st.composite
def _activation_case(draw, name, shape, dtype, scale, extremes):
    n, dt = draw(name), draw(dtype)
    x = _input(draw, draw(shape), dt, draw(scale), draw(extremes))
    weight = None
    if n == "PReLU":
        weight = _draw_array(draw, (1,), dt, sample=None, low=-1.0, high=1.0, flush=True, direct=True)
    return ActivationCase(x, n, weight)


_ACT_SHAPES = st.tuples(_BATCH, _CHANNELS, _SIDE, _SIDE)


def activation_cases(*, name=None, shape=None, dtype=np.float32, scale=2.0, extremes=True):
    """:class:`~refghost.testing.ActivationCase`: an activation name, an input and PReLU's slope.

    * ``name``: an activation of :data:`refghost.ops.ACTIVATIONS` or ``"hard_sigmoid"`` (the
      squeeze-excite gate); default: any of them
    * ``shape``: tuple of ints >= 1 (default (1-2, 1-4, 1-6, 1-6))
    * ``dtype``: float16, float32 (default), float64
    * ``scale`` (default 2, so the knees at ±3 are well covered), ``extremes``: as in
      :func:`input_arrays`

    PReLU's slope (shape (1,)) is drawn in [-1, 1]; other activations have ``weight=None``.

    .. code-block:: pycon

        >>> rst.activation_cases(name="HardSwish").example().name  # doctest: +SKIP
        'HardSwish'
    """
    default = st.sampled_from(tuple(ops.ACTIVATIONS) + ("hard_sigmoid",))
    return _activation_case(_option("name", name, _activation_or_gate, default),
                            _option("shape", shape, _shape_value, _ACT_SHAPES), _dtype(dtype),
                            _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


@st.composite
def _pool_case(draw, batch_size, channels, height, width, dtype, scale, extremes):
    shape = _nchw(draw, batch_size, channels, height, width)
    return PoolCase(_input(draw, shape, draw(dtype), draw(scale), draw(extremes)))


def global_avg_pool_cases(*, batch_size=None, channels=None, height=None, width=None, dtype=np.float32,
                          scale=1.0, extremes=True):
    """:class:`~refghost.testing.PoolCase`: an input (N, C, H, W) to average over H and W.

    * ``batch_size`` (default 1-2), ``channels`` (1-4): ints >= 1
    * ``height``, ``width``: ints >= 1 (default 1-12)
    * ``dtype``, ``scale``, ``extremes``: as in :func:`input_arrays`

    .. code-block:: pycon

        >>> rst.global_avg_pool_cases(height=7, width=7).example().x.shape[2:]  # doctest: +SKIP
        (7, 7)
    """
    side = st.integers(1, 12)
    return _pool_case(_option("batch_size", batch_size, _pos, _BATCH), _option("channels", channels, _pos, _CHANNELS),
                      _option("height", height, _pos, side), _option("width", width, _pos, side), _dtype(dtype),
                      _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


@st.composite
def _linear_case(draw, batch_size, in_features, out_features, bias, dtype, scale, extremes):
    n, i, o, dt = draw(batch_size), draw(in_features), draw(out_features), draw(dtype)
    x = _input(draw, (n, i), dt, draw(scale), draw(extremes))
    w = _conv_weight(draw, (o, i), dt)
    return LinearCase(x, w, _bias(draw, (o,), dt) if draw(bias) else None)


def linear_cases(*, batch_size=None, in_features=None, out_features=None, bias=None, dtype=np.float32,
                 scale=1.0, extremes=True):
    """:class:`~refghost.testing.LinearCase`: ``x`` (N, I), ``w`` (O, I), ``b`` (O,) or None.

    * ``batch_size`` (default 1-2), ``in_features`` (1-64), ``out_features`` (1-8): ints >= 1
    * ``bias``: bool (default: either)
    * ``dtype``, ``scale``, ``extremes``: as in :func:`input_arrays`

    .. code-block:: pycon

        >>> rst.linear_cases(in_features=1280, bias=True).example().w.shape[1]  # doctest: +SKIP
        1280
    """
    return _linear_case(_option("batch_size", batch_size, _pos, _BATCH),
                        _option("in_features", in_features, _pos, st.integers(1, 64)),
                        _option("out_features", out_features, _pos, st.integers(1, 8)),
                        _option("bias", bias, _bool, st.booleans()), _dtype(dtype),
                        _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


# --- GhostNet blocks and networks ----------------------------------------------------------------


def _activation_or_none(name, value):
    if value is not None:
        _activation(name, value)


_EVEN = st.integers(1, 4).map(lambda k: 2 * k)


@st.composite
def _ghost_module_config(draw, in_channels, out_channels, activation):
    return GhostModuleConfig(draw(in_channels), draw(out_channels), draw(activation))


def ghost_module_configs(*, in_channels=None, out_channels=None, activation=None):
    """:class:`~refghost.testing.GhostModuleConfig`.

    * ``in_channels``: int >= 1 (default 1-8)
    * ``out_channels``: even int >= 2 (default 2-8)
    * ``activation``: an activation name, or None for none (ghost2's); default: any or None

    .. code-block:: pycon

        >>> rst.ghost_module_configs(activation=None).example().activation is None  # doctest: +SKIP
        True
    """
    return _ghost_module_config(_option("in_channels", in_channels, _pos, st.integers(1, 8)),
                                _option("out_channels", out_channels, _even, _EVEN),
                                st.one_of(st.none(), activation_names()) if activation is None
                                else _checked("activation", activation, _activation_or_none))


@st.composite
def _ghost_bottleneck_config(draw, in_channels, mid_channels, out_channels, kernel_size, stride, se, activation):
    return GhostBottleneckConfig(draw(in_channels), draw(mid_channels), draw(out_channels), draw(kernel_size),
                                 draw(stride), draw(se), draw(activation))


def _kernel(name, value):
    if value not in (1, 3, 5, 7) or isinstance(value, bool):
        _fail(f"{name}={value!r} must be 1, 3, 5 or 7")


def _stride(name, value):
    if value not in (1, 2) or isinstance(value, bool):
        _fail(f"{name}={value!r} must be 1 or 2")


def ghost_bottleneck_configs(*, in_channels=None, mid_channels=None, out_channels=None, kernel_size=(3, 5),
                             stride=(1, 2), se=None, activation=None):
    """:class:`~refghost.testing.GhostBottleneckConfig`.

    * ``in_channels``: int >= 1 (default 1-8)
    * ``mid_channels``, ``out_channels``: even ints >= 2 (default 2-8)
    * ``kernel_size``: 3 or 5 (GhostNet's), or choices (default ``(3, 5)``)
    * ``stride``: 1 or 2, or choices (default ``(1, 2)``)
    * ``se``: bool, with squeeze-excite (default: either)
    * ``activation``: an activation name (default: any)

    .. code-block:: pycon

        >>> rst.ghost_bottleneck_configs(stride=1, se=True).example().se  # doctest: +SKIP
        True
    """
    return _ghost_bottleneck_config(_option("in_channels", in_channels, _pos, st.integers(1, 8)),
                                    _option("mid_channels", mid_channels, _even, _EVEN),
                                    _option("out_channels", out_channels, _even, _EVEN),
                                    _choices("kernel_size", kernel_size, _kernel), _choices("stride", stride, _stride),
                                    _option("se", se, _bool, st.booleans()),
                                    _option("activation", activation, _activation, activation_names()))


@st.composite
def _block_case(draw, cls, config, batch_size, height, width, dtype, scale, extremes):
    cfg, dt = draw(config), draw(dtype)
    shape = (draw(batch_size), cfg.in_channels, draw(height), draw(width))
    x = _input(draw, shape, dt, draw(scale), draw(extremes))
    return cls(x, random_params(cfg.graph(), seed=draw(_SEEDS), dtype=dt), cfg)


def _config_option(name, value, cls, default):
    if value is None:
        return default
    if _is_strategy(value):
        def check(v):
            if not isinstance(v, cls):
                _fail(f"{name} drew {v!r}, not a {cls.__name__}")
            return v
        return value.map(check)
    if not isinstance(value, cls):
        _fail(f"{name}={value!r} must be a {cls.__name__} or a strategy of them")
    return st.just(value)


def _block_options(batch_size, height, width, dtype, scale, extremes):
    return (_option("batch_size", batch_size, _pos, _BATCH), _option("height", height, _pos, st.integers(1, 8)),
            _option("width", width, _pos, st.integers(1, 8)), _dtype(dtype),
            _checked("scale", scale, _positive_float), _checked("extremes", extremes, _bool))


def ghost_module_cases(*, config=None, batch_size=None, height=None, width=None, dtype=np.float32, scale=1.0,
                       extremes=False):
    """:class:`~refghost.testing.GhostModuleCase`: a GhostModule, its parameters and an input.

    * ``config``: a :class:`~refghost.testing.GhostModuleConfig` or a strategy (default
      :func:`ghost_module_configs`)
    * ``batch_size`` (default 1-2), ``height``, ``width`` (1-8): ints >= 1
    * ``dtype``, ``scale``: as in :func:`input_arrays`
    * ``extremes``: bool, default False: the bound of a block has no underflow term, so keep
      subnormals out unless you mean to see it fail on them

    Parameters are drawn from a seed as ``tests/conftest.py`` does (well-scaled, BN near identity).

    .. code-block:: pycon

        >>> sorted(rst.ghost_module_cases().example().params)[:2]  # doctest: +SKIP
        ['cheap_operation.0.weight', 'cheap_operation.1.bias']
    """
    cfg = _config_option("config", config, GhostModuleConfig, ghost_module_configs())
    return _block_case(GhostModuleCase, cfg, *_block_options(batch_size, height, width, dtype, scale,
                                                                       extremes))


def ghost_bottleneck_cases(*, config=None, batch_size=None, height=None, width=None, dtype=np.float32, scale=1.0,
                           extremes=False):
    """:class:`~refghost.testing.GhostBottleneckCase`: a GhostBottleneck, its parameters and an input.

    Options as :func:`ghost_module_cases`, with ``config`` a
    :class:`~refghost.testing.GhostBottleneckConfig` or a strategy (default
    :func:`ghost_bottleneck_configs`).

    .. code-block:: pycon

        >>> case = rst.ghost_bottleneck_cases().example()  # doctest: +SKIP
        >>> case.x.shape[1] == case.config.in_channels  # doctest: +SKIP
        True
    """
    cfg = _config_option("config", config, GhostBottleneckConfig, ghost_bottleneck_configs())
    return _block_case(GhostBottleneckCase, cfg, *_block_options(batch_size, height, width, dtype,
                                                                           scale, extremes))


def _arch(name, value):
    if value not in ARCHITECTURES:
        _fail(f"{name}={value!r} must be one of {ARCHITECTURES}")


def _out_stages(name, value):
    if not isinstance(value, (tuple, list, set, frozenset)) or not value:
        _fail(f"{name}={value!r} must be a non-empty collection of stage indices")
    for s in value:
        _int(f"{name} element", s, 0)
        if s >= NUM_STAGES:
            _fail(f"{name}={value!r}: stages are 0..{NUM_STAGES - 1}")


@st.composite
def _ghostnet_config(draw, arch, width, activation, out_stages, num_classes):
    a = draw(arch)
    try:
        if a == "nanodet":
            nc = draw(num_classes) if num_classes is not None else 0
            return Config(a, draw(width), draw(activation), tuple(sorted(draw(out_stages))), nc)
        nc = draw(num_classes) if num_classes is not None else draw(st.integers(1, 10))
        return Config(a, draw(width), "ReLU", (), nc)
    except RefghostError as e:
        raise InvalidArgument(f"ghostnet_configs: {e}") from None


def ghostnet_configs(*, arch="nanodet", width=None, activation=None, out_stages=None, num_classes=None):
    """:class:`refghost.Config`: a GhostNet (NanoDet backbone or ImageNet classifier).

    * ``arch``: ``"nanodet"`` (default) or ``"ghostnet"``
    * ``width``: positive float (default one of 0.25, 0.5, 0.75, 1.0)
    * ``activation``: an activation name (default: any; ``"ghostnet"`` is always ReLU)
    * ``out_stages``: non-empty collection of stages 0..9 (default: any non-empty subset)
    * ``num_classes``: int >= 1, only for ``"ghostnet"`` (default 1-10)

    .. code-block:: pycon

        >>> rst.ghostnet_configs(width=0.5, out_stages=(4, 6, 9)).example().out_stages  # doctest: +SKIP
        (4, 6, 9)
    """
    archs = _checked("arch", arch, _arch)
    if arch == "ghostnet" and activation not in (None, "ReLU") and not _is_strategy(activation):
        _fail(f"arch 'ghostnet' uses ReLU throughout, got activation={activation!r}")
    if arch == "nanodet" and num_classes not in (None, 0) and not _is_strategy(num_classes):
        _fail("num_classes is only meaningful for arch='ghostnet'")
    stages = st.sets(st.integers(0, NUM_STAGES - 1), min_size=1)
    return _ghostnet_config(archs, _option("width", width, _positive_float, st.sampled_from((0.25, 0.5, 0.75, 1.0))),
                            _option("activation", activation, _activation, activation_names()),
                            _option("out_stages", out_stages, _out_stages, stages),
                            None if num_classes is None else _checked("num_classes", num_classes, _pos))
