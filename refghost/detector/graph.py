"""The whole NanoDet detector as a layer graph: :func:`build_detector_graph`.

The graph is a :class:`refghost.arch.Graph` (nodes in forward order, each naming the state_dict
keys it reads) that :func:`refghost.forward.execute` runs. Every parameter key is NanoDet's
state_dict key (``backbone.…``, ``fpn.…``, ``head.…``), so a NanoDet checkpoint's keys load as
they are; the keys NanoDet's state_dict holds but the forward pass never reads are listed by
:func:`unread_state_dict_keys`.

Node names
    A node is named by the PyTorch module path of the tensor it produces, as in
    :mod:`refghost.arch`. Examples per part:

    * ShuffleNetV2: ``backbone.conv1.0`` / ``.1`` / ``.2`` (conv, BN, act), ``backbone.maxpool``,
      ``backbone.stage2.0.branch1.4``, ``backbone.stage3.1.branch2.7``; a block's output (after
      the shuffle) is the block, ``backbone.stage2.3``.
    * GhostNet: :func:`refghost.arch.build_graph`'s names under ``backbone.``:
      ``backbone.blocks.6.4.ghost1.primary_conv.2``, ``backbone.blocks.9.0.act1``.
    * GhostPAN: ``fpn.reduce_layers.0.act``, ``fpn.top_down_blocks.0.blocks.0.ghost1``,
      ``fpn.downsamples.0.pwnorm``, ``fpn.bottom_up_blocks.1.blocks.0``,
      ``fpn.extra_lvl_out_conv.0.act.1``.
    * PAN: ``fpn.lateral_convs.2.conv``.
    * Heads: ``head.cls_convs.3.1.act.1``, ``head.gfl_cls.3``; legacy unshared:
      ``head.reg_convs.0.0.pwnorm``, ``head.gfl_reg.0``.

    Tensors that no module returns (or that a module returns more than once) are named under
    the module they belong to:

    * ``<path>.<k>`` for the k-th call of a module called more than once in a forward pass: the
      shared ``act`` of NanoDet's ``DepthwiseConvModule`` (``….act.0`` after the depthwise conv's
      BN, ``….act.1`` after the pointwise one, the module's output) and GhostPAN's
      ``fpn.upsample`` (``fpn.upsample.0`` upsamples the top level). PAN's ``F.interpolate``
      calls are named the same way: ``fpn.upsample.<k>`` (x2, top-down) and
      ``fpn.downsample.<k>`` (x0.5, bottom-up), k in call order.
    * ``<path>.<k>`` for the k-th tensor of a module's tuple output: ``fpn.<l>`` is the neck's
      level l where no submodule produces it (GhostPAN's extra level, the sum of
      ``fpn.extra_lvl_in_conv.0`` and ``fpn.extra_lvl_out_conv.0``; PAN's levels, sums); PAN's
      intermediate top-down sums are ``fpn.top_down.<l>``.
    * ``<path>.input`` for the concatenation a GhostPAN block reads
      (``fpn.top_down_blocks.0.input`` = cat(upsampled, lateral)); ShuffleNetV2 blocks:
      ``<block>.chunk.0`` / ``.chunk.1`` (the two channel halves of a stride-1 block's input)
      and ``<block>.cat`` (the concatenation before the shuffle); the legacy head's unshared
      ``head.cls_reg.<l>`` = cat(``gfl_cls.<l>``, ``gfl_reg.<l>``).
    * ``head``: the raw head output (N, priors, num_classes + 4*(reg_max+1)), what NanoDet's
      ``model.forward`` returns; ``output``: the same with the class scores sigmoided, what
      NanoDet's ``tools/export_onnx.py`` exports (``_forward_onnx``). The graph's one output is
      ``{"output": "output"}``.

    :func:`level_nodes` lists the nodes holding the neck's levels (``fpn.<l>`` in a capture of
    the neck's tuple output).

With ``config.folded`` each conv+BN pair is one conv with a bias named after the BN
(:attr:`refghost.arch.Config.folded`'s convention), e.g. ``fpn.downsamples.0.dwnorm`` reading
``fpn.downsamples.0.depthwise.weight`` and ``.bias``.
"""

from __future__ import annotations

from dataclasses import replace

from ..arch import Bottleneck, Graph, Node, _Builder, build_graph
from ..errors import RefghostError
from .spec import (
    SHUFFLENET_CHANNELS,
    SHUFFLENET_STAGE_REPEATS,
    DetectorConfig,
    backbone_channels,
)

#: Prefixes of the three parts in NanoDet's state_dict.
BACKBONE, NECK, HEAD = "backbone", "fpn", "head"
PARTS = (BACKBONE, NECK, HEAD)
#: The export-form output node (and the graph's one output).
OUTPUT = "output"


def prefixed(graph: Graph, prefix: str) -> Graph:
    """``graph`` with ``prefix + "."`` before every node name, input name (but the network's
    ``"input"``), parameter key and output node; output names are prefixed too."""
    def p(name):
        return name if name == "input" else f"{prefix}.{name}"

    nodes = [replace(n, name=p(n.name), inputs=tuple(p(i) for i in n.inputs),
                     params={role: p(key) for role, key in n.params.items()}) for n in graph.nodes]
    return Graph(graph.config, nodes, {p(k): p(v) for k, v in graph.outputs.items()},
                 {p(k): shape for k, shape in graph.param_shapes.items()})


class _DetectorBuilder(_Builder):
    """arch's builder (convs, BN, activations, GhostBottleneck) plus NanoDet's conv modules."""

    def __init__(self, config: DetectorConfig):  # not super(): no backbone Config here
        self.graph = Graph(config)
        self.act = None  # the activation _Builder.bottleneck applies in ghost1; set per block

    def act_call(self, name, x, act, module):
        """The activation module ``module`` (e.g. ``….act``) applied to x, as node ``name``."""
        if act == "PReLU":  # the module's one weight, whichever call this is
            return self._add(Node(name, "act", (x,), {"weight": f"{module}.weight"}, {"activation": act}),
                             {"weight": (1,)})
        return self._add(Node(name, "act", (x,), attrs={"activation": act}), {})

    def conv_module(self, name, x, in_chs, out_chs, kernel, *, stride=1, act=None, norm=True):
        """NanoDet's ConvModule: ``.conv`` (kxk, padding k//2; a bias only without norm), ``.bn``,
        ``.act`` (if ``act``)."""
        if norm:
            y = self.conv_bn(f"{name}.conv", f"{name}.bn", x, in_chs, out_chs, kernel, stride=stride)
        else:
            y = self.conv(f"{name}.conv", x, in_chs, out_chs, kernel, stride=stride, bias=True)
        return self.act_call(f"{name}.act", y, act, f"{name}.act") if act else y

    def depthwise_conv_module(self, name, x, in_chs, out_chs, kernel, *, stride=1, act):
        """NanoDet's DepthwiseConvModule: ``.depthwise`` (kxk, groups in) + ``.dwnorm`` + act,
        ``.pointwise`` (1x1) + ``.pwnorm`` + act; one ``.act`` module called twice."""
        y = self.conv_bn(f"{name}.depthwise", f"{name}.dwnorm", x, in_chs, in_chs, kernel, stride=stride,
                         groups=in_chs)
        y = self.act_call(f"{name}.act.0", y, act, f"{name}.act")
        y = self.conv_bn(f"{name}.pointwise", f"{name}.pwnorm", y, in_chs, out_chs, 1)
        return self.act_call(f"{name}.act.1", y, act, f"{name}.act")

    def conv_unit(self, depthwise, name, x, in_chs, out_chs, kernel, *, stride=1, act):
        """``DepthwiseConvModule`` if ``depthwise`` else ``ConvModule`` (with BN and ``act``)."""
        if depthwise:
            return self.depthwise_conv_module(name, x, in_chs, out_chs, kernel, stride=stride, act=act)
        return self.conv_module(name, x, in_chs, out_chs, kernel, stride=stride, act=act)

    def ghost_blocks(self, name, x, in_chs, out_chs, config: DetectorConfig):
        """GhostPAN's GhostBlocks: GhostBottleneck(in, int(out*expand), out, k, stride 1, no SE)
        (``.blocks.0``), plus ``.reduce_conv`` (1x1 conv with bias + act) added if use_res."""
        block = Bottleneck(name=f"{name}.blocks.0", stage=-1, in_chs=in_chs, mid_chs=int(out_chs * config.expand),
                           out_chs=out_chs, kernel=config.neck_kernel_size, stride=1, se_ratio=0.0)
        self.act = config.neck_activation
        y = self.bottleneck(x, block)
        if config.use_res:
            r = self.conv_module(f"{name}.reduce_conv", x, in_chs, out_chs, 1, act=config.neck_activation,
                                 norm=False)
            y = self.op(name, "add", y, r)
        return y


# --- backbones ---------------------------------------------------------------------------


def _shufflenet(b: _DetectorBuilder, config: DetectorConfig) -> list[str]:
    """ShuffleNetV2 (``with_last_conv=False``); returns the ``out_stages`` output nodes."""
    act = config.backbone_activation
    channels = SHUFFLENET_CHANNELS[config.backbone_width]
    x = b.conv_bn(f"{BACKBONE}.conv1.0", f"{BACKBONE}.conv1.1", "input", 3, channels[0], 3, stride=2)
    x = b.act_call(f"{BACKBONE}.conv1.2", x, act, f"{BACKBONE}.conv1.2")
    x = b.op(f"{BACKBONE}.maxpool", "max_pool", x, kernel=3, stride=2, padding=1)
    in_chs, outs = channels[0], {}
    for stage, repeats in SHUFFLENET_STAGE_REPEATS.items():
        out_chs = channels[stage - 1]
        half = out_chs // 2
        for i in range(repeats):
            p = f"{BACKBONE}.stage{stage}.{i}"
            if i == 0:  # stride 2: both branches read the whole input
                b1 = b.conv_bn(f"{p}.branch1.0", f"{p}.branch1.1", x, in_chs, in_chs, 3, stride=2, groups=in_chs)
                b1 = b.conv_bn(f"{p}.branch1.2", f"{p}.branch1.3", b1, in_chs, half, 1)
                left = b.act_call(f"{p}.branch1.4", b1, act, f"{p}.branch1.4")
                right, right_chs = x, in_chs
                stride = 2
            else:  # stride 1: x.chunk(2, dim=1); the first half passes through
                left = b.op(f"{p}.chunk.0", "slice", x, start=0, stop=half)
                right = b.op(f"{p}.chunk.1", "slice", x, start=half, stop=out_chs)
                right_chs, stride = half, 1
            y = b.conv_bn(f"{p}.branch2.0", f"{p}.branch2.1", right, right_chs, half, 1)
            y = b.act_call(f"{p}.branch2.2", y, act, f"{p}.branch2.2")
            y = b.conv_bn(f"{p}.branch2.3", f"{p}.branch2.4", y, half, half, 3, stride=stride, groups=half)
            y = b.conv_bn(f"{p}.branch2.5", f"{p}.branch2.6", y, half, half, 1)
            y = b.act_call(f"{p}.branch2.7", y, act, f"{p}.branch2.7")
            y = b.op(f"{p}.cat", "concat", left, y)
            x = b.op(p, "channel_shuffle", y, groups=2)
            in_chs = out_chs
        outs[stage] = x
    return [outs[s] for s in config.out_stages]


def _ghostnet(b: _DetectorBuilder, config: DetectorConfig) -> list[str]:
    """refghost's GhostNet graph under ``backbone.``; returns the ``out_stages`` output nodes."""
    backbone = prefixed(build_graph(config.ghostnet_config()), BACKBONE)
    b.graph.nodes += backbone.nodes
    b.graph.param_shapes.update(backbone.param_shapes)
    return [backbone.outputs[f"{BACKBONE}.blocks.{s}"] for s in config.out_stages]


# --- necks -------------------------------------------------------------------------------


def _ghost_pan(b: _DetectorBuilder, config: DetectorConfig, feats: list[str]) -> list[str]:
    """GhostPAN: 1x1 reduce, top-down (upsample, cat, GhostBlocks), bottom-up (downsample, cat,
    GhostBlocks), extra levels; returns the level nodes."""
    c, act, k = config.neck_channels, config.neck_activation, config.neck_kernel_size
    n = len(feats)
    reduced = [b.conv_module(f"{NECK}.reduce_layers.{i}", x, chs, c, 1, act=act)
               for i, (x, chs) in enumerate(zip(feats, backbone_channels(config)))]
    inner = [reduced[-1]]  # top-down: inner[0] is the highest level done so far
    for j, idx in enumerate(range(n - 1, 0, -1)):
        up = b.op(f"{NECK}.upsample.{j}", "upsample", inner[0], scale_factor=2)
        cat = b.op(f"{NECK}.top_down_blocks.{j}.input", "concat", up, reduced[idx - 1])
        inner.insert(0, b.ghost_blocks(f"{NECK}.top_down_blocks.{j}", cat, 2 * c, c, config))
    outs = [inner[0]]
    for i in range(n - 1):  # bottom-up
        down = b.conv_unit(config.use_depthwise, f"{NECK}.downsamples.{i}", outs[-1], c, c, k, stride=2, act=act)
        cat = b.op(f"{NECK}.bottom_up_blocks.{i}.input", "concat", down, inner[i + 1])
        outs.append(b.ghost_blocks(f"{NECK}.bottom_up_blocks.{i}", cat, 2 * c, c, config))
    for i in range(config.num_extra_level):
        e_in = b.conv_unit(config.use_depthwise, f"{NECK}.extra_lvl_in_conv.{i}", reduced[-1], c, c, k, stride=2,
                           act=act)
        e_out = b.conv_unit(config.use_depthwise, f"{NECK}.extra_lvl_out_conv.{i}", outs[-1], c, c, k, stride=2,
                            act=act)
        outs.append(b.op(f"{NECK}.{len(outs)}", "add", e_in, e_out))
    return outs


def _pan(b: _DetectorBuilder, config: DetectorConfig, feats: list[str]) -> list[str]:
    """The legacy PAN: 1x1 laterals (bias, no BN), top-down ``+= up x2``, bottom-up ``+= down
    x0.5`` (bilinear both); returns the level nodes."""
    c, n = config.neck_channels, len(feats)
    levels = [b.conv_module(f"{NECK}.lateral_convs.{i}", x, chs, c, 1, act=config.neck_activation, norm=False)
              for i, (x, chs) in enumerate(zip(feats, backbone_channels(config)))]

    def sum_name(level, bottom_up):  # a level's last sum is the neck's output fpn.<level>
        final = bottom_up or level == 0
        return f"{NECK}.{level}" if final else f"{NECK}.top_down.{level}"

    for j, i in enumerate(range(n - 1, 0, -1)):
        up = b.op(f"{NECK}.upsample.{j}", "upsample", levels[i], scale_factor=2)
        levels[i - 1] = b.op(sum_name(i - 1, False), "add", levels[i - 1], up)
    for i in range(n - 1):
        down = b.op(f"{NECK}.downsample.{i}", "upsample", levels[i], scale_factor=0.5)
        levels[i + 1] = b.op(sum_name(i + 1, True), "add", levels[i + 1], down)
    return levels


# --- heads -------------------------------------------------------------------------------


def _head(b: _DetectorBuilder, config: DetectorConfig, levels: list[str]) -> str:
    """NanoDetPlusHead or NanoDetHead: per level a tower of conv modules and 1x1 conv(s); the
    levels flattened into priors (node ``head``)."""
    feat, act, k = config.head_feat_channels, config.head_activation, config.head_kernel_size
    depthwise = config.head_conv_type == "DWConv"
    box_bins = 4 * (config.reg_max + 1)
    per_level = []
    for i, x in enumerate(levels):
        def tower(kind):
            y = x
            for j in range(config.stacked_convs):
                in_chs = config.neck_channels if j == 0 else feat
                y = b.conv_unit(depthwise, f"{HEAD}.{kind}.{i}.{j}", y, in_chs, feat, k, act=act)
            return y

        tower_chs = feat if config.stacked_convs else config.neck_channels
        cls = tower("cls_convs")
        if config.share_cls_reg:
            per_level.append(b.conv(f"{HEAD}.gfl_cls.{i}", cls, tower_chs, config.num_outputs, 1, bias=True))
        else:
            reg = tower("reg_convs")
            cls = b.conv(f"{HEAD}.gfl_cls.{i}", cls, tower_chs, config.num_classes, 1, bias=True)
            reg = b.conv(f"{HEAD}.gfl_reg.{i}", reg, tower_chs, box_bins, 1, bias=True)
            per_level.append(b.op(f"{HEAD}.cls_reg.{i}", "concat", cls, reg))
    return b.op(HEAD, "flatten_levels", *per_level)


def _build(config: DetectorConfig) -> tuple[Graph, list[str]]:
    """The graph of ``config`` and its neck's level nodes."""
    if not isinstance(config, DetectorConfig):
        raise RefghostError(f"build_detector_graph needs a DetectorConfig, got {type(config).__name__}")
    b = _DetectorBuilder(config)
    feats = (_shufflenet if config.backbone == "shufflenetv2" else _ghostnet)(b, config)
    levels = (_ghost_pan if config.neck == "ghost_pan" else _pan)(b, config, feats)
    raw = _head(b, config, levels)
    b.op(OUTPUT, "sigmoid_classes", raw, num_classes=config.num_classes)
    b.graph.outputs = {OUTPUT: OUTPUT}
    return b.graph, levels


def build_detector_graph(config: DetectorConfig) -> Graph:
    """The layer graph of the NanoDet detector ``config`` (see the module docstring).

    ``graph.config`` is ``config``; ``graph.outputs`` is ``{"output": "output"}``, the exported
    form (N, priors, num_classes + 4*(reg_max+1)) with sigmoided class scores.
    ``graph.param_shapes`` is in forward order (the order nodes first read each key), which is
    not always NanoDet's registration order (e.g. a DepthwiseConvModule registers ``pointwise``
    before ``dwnorm``); the keys and shapes are NanoDet's.
    """
    return _build(config)[0]


def level_nodes(config: DetectorConfig) -> list[str]:
    """The nodes holding the neck's output levels, in stride order: the head's inputs, and
    ``fpn.<l>`` in a capture of NanoDet's neck (which returns them as a tuple)."""
    return _build(config)[1]


def unread_state_dict_keys(config: DetectorConfig) -> dict[str, tuple[int, ...]]:
    """Keys (with shapes) that NanoDet's state_dict holds for ``config`` but inference never reads.

    ``head.distribution_project.project`` (the Integral's ``linspace(0, reg_max, reg_max+1)``
    buffer, used only by the box decoding) and, for the legacy head with ``share_cls_reg``,
    ``head.gfl_reg.<l>.weight``/``.bias`` (NanoDetHead builds them whether or not it uses them).
    NanoDet's training-only ``aux_fpn.*``/``aux_head.*`` (Plus) are not listed.
    """
    keys = {f"{HEAD}.distribution_project.project": (config.reg_max + 1,)}
    if config.head == "nanodet" and config.share_cls_reg:
        for i in range(len(config.strides)):
            keys[f"{HEAD}.gfl_reg.{i}.weight"] = (4 * (config.reg_max + 1), config.head_feat_channels, 1, 1)
            keys[f"{HEAD}.gfl_reg.{i}.bias"] = (4 * (config.reg_max + 1),)
    return keys
