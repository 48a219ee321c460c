"""GhostNet's architecture as data: the stage table, the channel rounding, and the layer graph.

Sources: Han et al., "GhostNet: More Features from Cheap Operations" (CVPR 2020,
https://arxiv.org/abs/1911.11907); NanoDet's ``nanodet/model/backbone/ghostnet.py``; Huawei's
``ghostnet_pytorch/ghostnet.py``. The facts used here are collected in ``docs/architecture.md``.

:func:`build_graph` turns a :class:`Config` into a :class:`Graph`: a flat list of :class:`Node`
in forward order, each named by the PyTorch module path that produces the same tensor
(``conv_stem``, ``blocks.3.0.ghost1.primary_conv.1``, ``blocks.3.0.se``, ``blocks.3.0``) and
naming the state_dict keys it reads. Those names have one home: :class:`Bottleneck` (a block's
parts), :class:`ConvBn` (:data:`STEM`, :data:`FINAL_CONV`, :func:`ghost_module_parts`,
:attr:`Bottleneck.shortcut_parts`) and :class:`SqueezeExcite`. Nothing here computes; :mod:`refghost.forward` executes a
graph, :mod:`refghost.weights` checks a weights file against :attr:`Graph.param_shapes`.

Two architectures:

``nanodet``
    NanoDet's backbone: any width, any ``out_stages`` subset of 0..9, any activation of
    :data:`refghost.ops.ACTIVATIONS` applied where NanoDet applies it (stem ``act1``, both
    branches of every ``ghost1``, ``blocks.9.0.act1``). The SE always uses ReLU inside.
``ghostnet``
    Huawei's (and timm's) ImageNet classifier: the same backbone with ReLU everywhere, then
    global average pool, ``conv_head`` (1x1, 1280 channels, bias) + ReLU, and ``classifier``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import RefghostError
from .ops import ACTIVATIONS, conv_output_size

ARCHITECTURES = ("nanodet", "ghostnet")
#: NanoDet's default feature taps: strides 8, 16, 32.
DEFAULT_OUT_STAGES = (4, 6, 9)
#: Channels of Huawei's ``conv_head`` (not scaled by width).
HEAD_CHANNELS = 1280
#: Every channel count in GhostNet is rounded to a multiple of this.
CHANNEL_DIVISOR = 4
#: :func:`make_divisible` never rounds a channel count below this fraction of it.
MIN_ROUNDED_FRACTION = 0.9
#: Output channels of the stem conv before width scaling (:func:`stem_channels`).
STEM_CHANNELS = 16
#: Channel reduction of every squeeze-excite of GhostNet: ``make_divisible(C * SE_RATIO)``.
SE_RATIO = 0.25


class Block(NamedTuple):
    """One GhostBottleneck row of the stage table."""

    kernel: int  # depthwise kernel of the stride-2 conv and of the conv shortcut (3 or 5)
    mid: int  # expansion channels (before width scaling)
    out: int  # output channels (before width scaling)
    se_ratio: float  # 0 for no squeeze-excite, else its channel reduction (SE_RATIO)
    stride: int


#: Stages 0..8 of GhostNet 1.0x; stage 9 is a 1x1 ConvBnAct to the last row's ``mid`` channels.
STAGES = (
    (Block(3, 16, 16, 0.0, 1),),
    (Block(3, 48, 24, 0.0, 2),),
    (Block(3, 72, 24, 0.0, 1),),
    (Block(5, 72, 40, SE_RATIO, 2),),
    (Block(5, 120, 40, SE_RATIO, 1),),
    (Block(3, 240, 80, 0.0, 2),),
    (
        Block(3, 200, 80, 0.0, 1),
        Block(3, 184, 80, 0.0, 1),
        Block(3, 184, 80, 0.0, 1),
        Block(3, 480, 112, SE_RATIO, 1),
        Block(3, 672, 112, SE_RATIO, 1),
    ),
    (Block(5, 672, 160, SE_RATIO, 2),),
    (
        Block(5, 960, 160, 0.0, 1),
        Block(5, 960, 160, SE_RATIO, 1),
        Block(5, 960, 160, 0.0, 1),
        Block(5, 960, 160, SE_RATIO, 1),
    ),
)
NUM_STAGES = len(STAGES) + 1  # + the final ConvBnAct


@dataclass(frozen=True)
class Bottleneck:
    """One GhostBottleneck of a network: its module path, its channels (width applied) and the
    module paths of its parts, ``None`` where it has none. The one statement of which parts a
    block has: :func:`build_graph` builds them and the engine (:mod:`refghost.engine`) reads them.
    """

    name: str  # e.g. "blocks.3.0"
    stage: int  # its row of STAGES
    in_chs: int
    mid_chs: int
    out_chs: int
    kernel: int  # of the stride-2 depthwise conv and of the conv shortcut
    stride: int
    se_ratio: float  # 0: no squeeze-excite

    @property
    def ghost1(self) -> str:
        """The first GhostModule (in -> mid channels, with the activation)."""
        return f"{self.name}.ghost1"

    @property
    def ghost2(self) -> str:
        """The second GhostModule (mid -> out channels, no activation)."""
        return f"{self.name}.ghost2"

    @property
    def conv_dw(self) -> str | None:
        """The strided depthwise conv between the ghost modules (its BN: :attr:`bn_dw`)."""
        return f"{self.name}.conv_dw" if self.stride > 1 else None

    @property
    def bn_dw(self) -> str | None:
        return f"{self.name}.bn_dw" if self.stride > 1 else None

    @property
    def se(self) -> str | None:
        """The squeeze-excite on the mid channels."""
        return f"{self.name}.se" if self.se_ratio > 0 else None

    @property
    def se_channels(self) -> int:
        """The squeeze-excite's reduced channels (0 without one)."""
        return make_divisible(self.mid_chs * self.se_ratio) if self.se_ratio > 0 else 0

    @property
    def shortcut(self) -> str | None:
        """The conv shortcut (its nodes: :attr:`shortcut_parts`), or None: the identity (in == out
        channels and stride 1)."""
        return None if self.in_chs == self.out_chs and self.stride == 1 else f"{self.name}.shortcut"

    @property
    def shortcut_parts(self) -> tuple[ConvBn, ConvBn] | None:
        """The conv shortcut's depthwise conv+BN (``.0``/``.1``, stride :attr:`stride`) and 1x1
        conv+BN (``.2``/``.3``), neither with an activation."""
        s = self.shortcut
        return None if s is None else (ConvBn(f"{s}.0", f"{s}.1"), ConvBn(f"{s}.2", f"{s}.3"))


def stem_channels(config: Config) -> int:
    """Output channels of the stem conv."""
    return make_divisible(STEM_CHANNELS * config.width)


def blocks(config: Config) -> Iterator[Bottleneck]:
    """The GhostBottlenecks of ``config`` in forward order (stages 0..8 of :data:`STAGES`)."""
    in_chs = stem_channels(config)
    for stage, rows in enumerate(STAGES):
        for i, row in enumerate(rows):
            out_chs = make_divisible(row.out * config.width)
            yield Bottleneck(f"blocks.{stage}.{i}", stage, in_chs, make_divisible(row.mid * config.width), out_chs,
                             row.kernel, row.stride, row.se_ratio)
            in_chs = out_chs


#: Module path of stage 9, the final 1x1 ConvBnAct (its nodes: :data:`FINAL_CONV`).
FINAL_BLOCK = f"blocks.{len(STAGES)}.0"


@dataclass(frozen=True)
class ConvBn:
    """Node names of a conv, the BatchNorm after it and the activation after that (None: the
    network puts none there)."""

    conv: str
    bn: str
    act: str | None = None


#: The stem: a 3x3 stride-2 conv, BN and the backbone's activation.
STEM = ConvBn("conv_stem", "bn1", "act1")
#: Stage 9: a 1x1 conv to the last row's ``mid`` channels, BN and the backbone's activation.
FINAL_CONV = ConvBn(f"{FINAL_BLOCK}.conv", f"{FINAL_BLOCK}.bn1", f"{FINAL_BLOCK}.act1")


@dataclass(frozen=True)
class ClassifierHead:
    """Node names of the ImageNet head (arch ``ghostnet``): global average pool, 1x1 conv with
    bias, ReLU, linear layer; the graph's one output is named ``classifier`` too."""

    pool: str = "global_pool"
    conv: str = "conv_head"
    act: str = "act2"
    classifier: str = "classifier"


#: The head of the ``ghostnet`` classifier.
HEAD = ClassifierHead()


def ghost_module_parts(name: str, activated: bool) -> tuple[ConvBn, ConvBn]:
    """The primary 1x1 conv and the cheap depthwise conv of the GhostModule ``name``, each with an
    activation if ``activated`` (a block's ghost1); the module is the concat of their outputs."""
    return tuple(ConvBn(f"{name}.{part}.0", f"{name}.{part}.1", f"{name}.{part}.2" if activated else None)
                 for part in ("primary_conv", "cheap_operation"))


@dataclass(frozen=True)
class SqueezeExcite:
    """Node names of the squeeze-excite ``name``: channel means, 1x1 conv to the reduced channels,
    ReLU, 1x1 conv back, hard-sigmoid gate; ``name`` itself is the input times the gate."""

    name: str

    @property
    def avg_pool(self) -> str:
        return f"{self.name}.avg_pool"

    @property
    def conv_reduce(self) -> str:
        return f"{self.name}.conv_reduce"

    @property
    def act(self) -> str:
        return f"{self.name}.act1"

    @property
    def conv_expand(self) -> str:
        return f"{self.name}.conv_expand"

    @property
    def gate(self) -> str:
        return f"{self.name}.gate"


def make_divisible(v: float, divisor: int = CHANNEL_DIVISOR, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``v``.

    ``max(min_value, int(v + divisor/2) // divisor * divisor)``, plus ``divisor`` if that fell
    under ``0.9 * v``; ``min_value`` defaults to ``divisor``. (TensorFlow's MobileNet rule, as
    NanoDet, Huawei and timm compute it.)
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < MIN_ROUNDED_FRACTION * v:
        new_v += divisor
    return new_v


def canonical_activation(name: str) -> str:
    """NanoDet's activation name, with its alias ``Hardswish`` mapped to ``HardSwish``."""
    if name == "Hardswish":
        return "HardSwish"
    if name not in ACTIVATIONS:
        raise RefghostError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return name


@dataclass(frozen=True)
class Config:
    """Which GhostNet: architecture, width multiplier, activation, output stages, classes."""

    arch: str = "nanodet"
    width: float = 1.0
    activation: str = "ReLU"
    out_stages: tuple[int, ...] = DEFAULT_OUT_STAGES
    num_classes: int = 0  # ghostnet only
    #: BatchNorm folded into the convolutions (as ONNX exporters do): each conv+BN pair is one conv
    #: with a bias, keyed ``<conv>.weight``/``<conv>.bias`` and named after the BN it replaces.
    folded: bool = False

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise RefghostError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if not (isinstance(self.width, (int, float)) and math.isfinite(self.width) and self.width > 0):
            raise RefghostError(f"width must be a positive number, got {self.width!r}")
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "activation", canonical_activation(self.activation))
        stages = tuple(sorted({int(s) for s in self.out_stages}))
        if self.arch == "nanodet":
            if not stages or any(s < 0 or s >= NUM_STAGES for s in stages):
                raise RefghostError(f"out_stages must be a non-empty subset of 0..{NUM_STAGES - 1}, "
                                    f"got {tuple(self.out_stages)}")
            if self.num_classes:
                raise RefghostError("num_classes is only meaningful for arch 'ghostnet'")
        else:
            if self.activation != "ReLU":
                raise RefghostError(f"arch 'ghostnet' uses ReLU throughout, got activation {self.activation!r}")
            if self.num_classes < 1:
                raise RefghostError(f"arch 'ghostnet' needs num_classes >= 1, got {self.num_classes}")
            stages = ()
        object.__setattr__(self, "out_stages", stages)


@dataclass(frozen=True)
class Node:
    """One layer of the graph.

    ``name`` is the PyTorch module path of the tensor it produces. ``op`` is one of
    ``conv``, ``batch_norm``, ``act``, ``concat``, ``add``, ``global_avg_pool``,
    ``hard_sigmoid``, ``scale``, ``linear``. ``inputs`` are the names of the nodes it reads
    (``"input"`` is the network input). ``params`` maps a parameter role (``weight``, ``bias``,
    ``running_mean``, ``running_var``) to its state_dict key; ``attrs`` holds the rest
    (``stride``, ``padding``, ``groups``, ``activation``, ``eps``).

    The whole detector (:mod:`refghost.detector.graph`) adds, computed by
    :mod:`refghost.detector.ops`: ``max_pool`` (attrs ``kernel``, ``stride``, ``padding``),
    ``channel_shuffle`` (``groups``), ``slice`` (channels ``start``:``stop``), ``upsample``
    (``scale_factor``; bilinear, align_corners False), ``flatten_levels`` (its inputs, one
    (N, C, Hi, Wi) map per level, as (N, sum Hi*Wi, C)) and ``sigmoid_classes`` (``num_classes``:
    sigmoid on that many leading entries of the last axis).
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    params: dict[str, str] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    """A GhostNet as nodes in forward order, its parameter shapes and its output names.

    ``outputs`` maps each output name (``blocks.4``, ..., or ``classifier``) to the node that
    produces it. ``param_shapes`` lists every state_dict key the forward pass reads, in
    state_dict order, with its shape.
    """

    config: Config
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Graph({self.config!r}, <{len(self.nodes)} nodes, {len(self.param_shapes)} parameters>, "
                f"outputs={self.outputs!r})")

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


class _Builder:
    """Appends nodes and their parameter shapes while walking the module tree."""

    def __init__(self, config: Config):
        self.graph = Graph(config)
        self.act = config.activation

    def _add(self, node: Node, shapes: dict[str, tuple[int, ...]]) -> str:
        for role, shape in shapes.items():
            self.graph.param_shapes[node.params[role]] = shape
        self.graph.nodes.append(node)
        return node.name

    def conv(self, name, x, in_chs, out_chs, kernel, *, stride=1, groups=1, bias=False, key=None):
        """A conv node called ``name`` reading ``<key>.weight`` (and ``.bias``); key defaults to name."""
        key = key or name
        params = {"weight": f"{key}.weight"}
        shapes = {"weight": (out_chs, in_chs // groups, kernel, kernel)}
        if bias:
            params["bias"] = f"{key}.bias"
            shapes["bias"] = (out_chs,)
        attrs = {"stride": stride, "padding": (kernel - 1) // 2, "groups": groups}
        return self._add(Node(name, "conv", (x,), params, attrs), shapes)

    def batch_norm(self, name, x, chs):
        roles = ("weight", "bias", "running_mean", "running_var")
        params = {r: f"{name}.{r}" for r in roles}
        return self._add(Node(name, "batch_norm", (x,), params), {r: (chs,) for r in roles})

    def activation(self, name, x, act):
        if act == "PReLU":
            return self._add(Node(name, "act", (x,), {"weight": f"{name}.weight"}, {"activation": act}),
                             {"weight": (1,)})
        return self._add(Node(name, "act", (x,), attrs={"activation": act}), {})

    def op(self, name, op, *inputs, **attrs):
        return self._add(Node(name, op, tuple(inputs), attrs=attrs), {})

    def conv_bn(self, conv_name, bn_name, x, in_chs, out_chs, kernel, **conv_kw):
        if self.graph.config.folded:  # one conv with a bias, producing what the BN would
            return self.conv(bn_name, x, in_chs, out_chs, kernel, bias=True, key=conv_name, **conv_kw)
        x = self.conv(conv_name, x, in_chs, out_chs, kernel, **conv_kw)
        return self.batch_norm(bn_name, x, out_chs)

    def ghost_module(self, name, x, in_chs, out_chs, act):
        """GhostModule: 1x1 conv to ceil(out/2) channels, a 3x3 depthwise 'cheap' copy, concat."""
        init = math.ceil(out_chs / 2)
        primary, cheap = ghost_module_parts(name, activated=bool(act))
        y = self.conv_bn(primary.conv, primary.bn, x, in_chs, init, 1)
        if primary.act:
            y = self.activation(primary.act, y, act)
        z = self.conv_bn(cheap.conv, cheap.bn, y, init, init, 3, groups=init)
        if cheap.act:
            z = self.activation(cheap.act, z, act)
        # NanoDet returns the whole concat (2*init channels); Huawei and timm slice it to out_chs.
        # make_divisible(..., 4) keeps out_chs even, so 2*init == out_chs and the slice is a no-op.
        assert 2 * init == out_chs, (name, out_chs)
        return self.op(name, "concat", y, z)

    def squeeze_excite(self, name, x, chs, reduced):
        """SE: channel means -> 1x1 conv to ``reduced`` -> ReLU -> 1x1 conv -> hard-sigmoid gate -> x * gate."""
        se = SqueezeExcite(name)
        s = self.op(se.avg_pool, "global_avg_pool", x)
        s = self.conv(se.conv_reduce, s, chs, reduced, 1, bias=True)
        s = self.activation(se.act, s, "ReLU")  # always ReLU, whatever the backbone uses
        s = self.conv(se.conv_expand, s, reduced, chs, 1, bias=True)
        g = self.op(se.gate, "hard_sigmoid", s)  # a function in PyTorch, named here
        return self.op(name, "scale", x, g)

    def bottleneck(self, x, block: Bottleneck):
        y = self.ghost_module(block.ghost1, x, block.in_chs, block.mid_chs, self.act)
        if block.conv_dw:
            y = self.conv_bn(block.conv_dw, block.bn_dw, y, block.mid_chs, block.mid_chs, block.kernel,
                             stride=block.stride, groups=block.mid_chs)  # no activation after bn_dw
        if block.se:
            y = self.squeeze_excite(block.se, y, block.mid_chs, block.se_channels)
        y = self.ghost_module(block.ghost2, y, block.mid_chs, block.out_chs, None)
        if block.shortcut_parts is None:
            shortcut = x
        else:
            dw, pw = block.shortcut_parts
            shortcut = self.conv_bn(dw.conv, dw.bn, x, block.in_chs, block.in_chs, block.kernel,
                                    stride=block.stride, groups=block.in_chs)
            shortcut = self.conv_bn(pw.conv, pw.bn, shortcut, block.in_chs, block.out_chs, 1)
        return self.op(block.name, "add", y, shortcut)  # no activation after the residual add


def backbone_activations(config: Config) -> list[str]:
    """The activation nodes that apply ``config.activation``, in forward order: the stem's, both
    halves of every ghost1 and the final conv's (the SE's and the head's are always ReLU)."""
    names = [STEM.act]
    for block in blocks(config):
        names += [part.act for part in ghost_module_parts(block.ghost1, activated=True)]
    return names + [FINAL_CONV.act]


def ghost_module_graph(name: str, in_chs: int, out_chs: int, activation: str | None) -> Graph:
    """A standalone GhostModule called ``name`` reading ``"input"`` (``activation`` None: none)."""
    b = _Builder(Config(activation=activation or "ReLU"))
    b.ghost_module(name, "input", in_chs, out_chs, activation)
    return b.graph


def bottleneck_graph(block: Bottleneck, activation: str) -> Graph:
    """A standalone GhostBottleneck ``block`` reading ``"input"``."""
    b = _Builder(Config(activation=activation))
    b.bottleneck("input", block)
    return b.graph


def build_graph(config: Config) -> Graph:
    """The layer graph of GhostNet for ``config`` (see the module docstring)."""
    b = _Builder(config)
    x = b.conv_bn(STEM.conv, STEM.bn, "input", 3, stem_channels(config), 3, stride=2)
    x = b.activation(STEM.act, x, config.activation)
    stage_out = {}
    for block in blocks(config):
        x = b.bottleneck(x, block)
        stage_out[block.stage] = x
    final_chs = make_divisible(STAGES[-1][-1].mid * config.width)
    x = b.conv_bn(FINAL_CONV.conv, FINAL_CONV.bn, x, block.out_chs, final_chs, 1)  # after the last block
    x = b.activation(FINAL_CONV.act, x, config.activation)
    stage_out[len(STAGES)] = x
    graph = b.graph
    if config.arch == "nanodet":
        graph.outputs = {f"blocks.{s}": stage_out[s] for s in config.out_stages}
    else:
        x = b.op(HEAD.pool, "global_avg_pool", x)
        x = b.conv(HEAD.conv, x, final_chs, HEAD_CHANNELS, 1, bias=True)
        x = b.activation(HEAD.act, x, "ReLU")
        c = HEAD.classifier
        x = b._add(Node(c, "linear", (x,), {"weight": f"{c}.weight", "bias": f"{c}.bias"}),
                   {"weight": (config.num_classes, HEAD_CHANNELS), "bias": (config.num_classes,)})
        graph.outputs = {HEAD.classifier: x}
    return graph


def output_shapes(graph: Graph, n: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shape of every node's output for an input of shape (n, 3, height, width)."""
    shapes = {"input": (n, 3, height, width)}
    for node in graph.nodes:
        src = shapes[node.inputs[0]]
        if node.op == "conv":
            o, _, k, _ = graph.param_shapes[node.params["weight"]]
            s, p = node.attrs["stride"], node.attrs["padding"]
            shapes[node.name] = (src[0], o, conv_output_size(src[2], k, s, p), conv_output_size(src[3], k, s, p))
        elif node.op == "concat":
            shapes[node.name] = (src[0], sum(shapes[i][1] for i in node.inputs), src[2], src[3])
        elif node.op == "global_avg_pool":
            shapes[node.name] = (src[0], src[1], 1, 1)
        elif node.op == "linear":
            shapes[node.name] = (src[0], graph.param_shapes[node.params["weight"]][0])
        elif node.op == "max_pool":
            k, s, p = node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"]
            shapes[node.name] = (src[0], src[1], conv_output_size(src[2], k, s, p), conv_output_size(src[3], k, s, p))
        elif node.op == "slice":
            shapes[node.name] = (src[0], node.attrs["stop"] - node.attrs["start"], src[2], src[3])
        elif node.op == "upsample":
            from .detector.ops import upsample_output_size

            f = node.attrs["scale_factor"]
            shapes[node.name] = (src[0], src[1], upsample_output_size(src[2], f), upsample_output_size(src[3], f))
        elif node.op == "flatten_levels":
            shapes[node.name] = (src[0], sum(shapes[i][2] * shapes[i][3] for i in node.inputs), src[1])
        else:
            shapes[node.name] = src
    return shapes
