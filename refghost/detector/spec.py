"""Which NanoDet detector: backbone, neck and head as data (:class:`DetectorConfig`), the named
configurations NanoDet ships or the community uses (:data:`PRESETS`), and the feature-map sizes
the network produces for an input size (:func:`level_sizes`, :func:`num_priors`).

Sources: NanoDet (https://github.com/RangiLyu/nanodet) ``nanodet/model/backbone/shufflenetv2.py``,
``ghostnet.py``, ``nanodet/model/fpn/ghost_pan.py``, ``pan.py``, ``nanodet/model/head/
nanodet_plus_head.py``, ``nanodet_head.py``, ``config/nanodet-plus-m*.yml`` and
``config/legacy_v0.x_configs/nanodet-m.yml``. A config is the architecture only: no weights, no
input size, no preprocessing. :func:`refghost.detector.graph.build_detector_graph` turns it into
a layer graph.

Every field defaults to NanoDet-Plus-m (``config/nanodet-plus-m_320.yml``). Fields that belong to
one component only are documented as such and checked against it: a PAN has no extra level, the
legacy head's convs are 3x3, the Plus head always shares one branch for classes and boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..arch import STAGES as GHOSTNET_STAGES
from ..arch import Config as GhostNetConfig
from ..arch import canonical_activation, make_divisible
from ..errors import RefghostError
from ..ops import conv_output_size

BACKBONES = ("shufflenetv2", "ghostnet")
NECKS = ("ghost_pan", "pan")
HEADS = ("nanodet_plus", "nanodet")
#: Convolution modules of a head: NanoDet's ``DepthwiseConvModule`` (depthwise kxk + BN + act,
#: then pointwise 1x1 + BN + act) or ``ConvModule`` (dense kxk + BN + act).
HEAD_CONV_TYPES = ("DWConv", "Conv")

#: ShuffleNetV2's output channels of conv1 and stages 2, 3, 4 per width (``_stage_out_channels``
#: without conv5, which NanoDet never builds: ``with_last_conv=False``).
SHUFFLENET_CHANNELS = {
    0.5: (24, 48, 96, 192),
    1.0: (24, 116, 232, 464),
    1.5: (24, 176, 352, 704),
    2.0: (24, 244, 488, 976),
}
#: ShuffleNetV2's stages that can be outputs, and the stride of each.
SHUFFLENET_STAGE_STRIDES = {2: 8, 3: 16, 4: 32}
#: Blocks per stage of ShuffleNetV2 (stages 2, 3, 4); the first of each has stride 2.
SHUFFLENET_STAGE_REPEATS = {2: 4, 3: 8, 4: 4}
#: NanoDet's default feature taps of each backbone (strides 8, 16, 32).
DEFAULT_OUT_STAGES = {"shufflenetv2": (2, 3, 4), "ghostnet": (4, 6, 9)}
#: The legacy head's (``NanoDetHead``) convs are 3x3, padding 1, whatever the config says.
LEGACY_HEAD_KERNEL = 3


@dataclass(frozen=True)
class DetectorConfig:
    """A NanoDet detector's architecture. Defaults: NanoDet-Plus-m.

    Backbone
        ``backbone`` "shufflenetv2" or "ghostnet"; ``backbone_width`` (ShuffleNetV2's
        ``model_size``: 0.5, 1.0, 1.5 or 2.0; GhostNet: any positive multiplier);
        ``backbone_activation`` (a name of :data:`refghost.ops.ACTIVATIONS`, NanoDet's spelling);
        ``out_stages`` (None: the backbone's default, :data:`DEFAULT_OUT_STAGES`).
    Neck
        ``neck`` "ghost_pan" (GhostPAN) or "pan" (the legacy PAN); ``neck_channels`` (its
        ``out_channels``); ``neck_activation`` (GhostPAN: an activation name; PAN: None, as every
        NanoDet config has it, which makes its lateral 1x1 convs plain convs with a bias, or a name
        for PAN's ``activation`` argument). GhostPAN only: ``neck_kernel_size`` (the depthwise
        kernel of the shortcut, downsample and extra-level convs), ``num_extra_level`` (0 or 1; PAN:
        must be 0), ``use_depthwise`` (downsample and extra convs are ``DepthwiseConvModule``, else
        ``ConvModule``), ``expand``, ``num_blocks`` (1: NanoDet's GhostBlocks fails with more),
        ``use_res`` (of its ``GhostBlocks``).
    Head
        ``head`` "nanodet_plus" (NanoDetPlusHead) or "nanodet" (the legacy NanoDetHead);
        ``num_classes``; ``head_feat_channels``; ``stacked_convs``; ``head_kernel_size`` (legacy:
        must be 3, NanoDetHead hard-codes it); ``head_activation``; ``share_cls_reg`` (one conv
        tower and one 1x1 conv for classes and boxes; NanoDetPlusHead always shares, so True);
        ``head_conv_type`` ("DWConv" or "Conv", both heads); ``reg_max`` (bins 0..reg_max per box
        side); ``strides`` (one per neck output, the real stride of each level).
    ``folded``
        BatchNorm folded into the convolutions, as ONNX exporters do (the convention of
        :attr:`refghost.arch.Config.folded`).

    The head's input channels are ``neck_channels``; every conv has BatchNorm except the PAN's
    laterals and the 1x1 ``gfl_cls``/``gfl_reg`` (which have a bias), as in NanoDet's configs.
    """

    backbone: str = "shufflenetv2"
    backbone_width: float = 1.0
    backbone_activation: str = "LeakyReLU"
    out_stages: tuple[int, ...] | None = None
    neck: str = "ghost_pan"
    neck_channels: int = 96
    neck_activation: str | None = "LeakyReLU"
    neck_kernel_size: int = 5
    num_extra_level: int = 1
    use_depthwise: bool = True
    expand: float = 1
    num_blocks: int = 1
    use_res: bool = False
    head: str = "nanodet_plus"
    num_classes: int = 80
    head_feat_channels: int = 96
    stacked_convs: int = 2
    head_kernel_size: int = 5
    head_activation: str = "LeakyReLU"
    share_cls_reg: bool = True
    head_conv_type: str = "DWConv"
    reg_max: int = 7
    strides: tuple[int, ...] = (8, 16, 32, 64)
    folded: bool = False

    def __post_init__(self):
        def fail(field, problem):
            raise RefghostError(f"DetectorConfig.{field}: {problem}")

        def positive_int(field, minimum=1):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(field, f"must be an integer >= {minimum}, got {value!r}")

        def boolean(field):
            if not isinstance(getattr(self, field), bool):
                fail(field, f"must be True or False, got {getattr(self, field)!r}")

        def activation(field):
            try:
                object.__setattr__(self, field, canonical_activation(getattr(self, field)))
            except (RefghostError, TypeError) as e:
                fail(field, str(e))

        def one_of(field, choices):
            if getattr(self, field) not in choices:
                fail(field, f"must be one of {choices}, got {getattr(self, field)!r}")

        # backbone
        one_of("backbone", BACKBONES)
        width = self.backbone_width
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
            fail("backbone_width", f"must be a positive number, got {width!r}")
        object.__setattr__(self, "backbone_width", float(width))
        if self.backbone == "shufflenetv2" and self.backbone_width not in SHUFFLENET_CHANNELS:
            fail("backbone_width", f"ShuffleNetV2 exists at widths {tuple(SHUFFLENET_CHANNELS)}, "
                                   f"got {self.backbone_width}")
        activation("backbone_activation")
        stages = DEFAULT_OUT_STAGES[self.backbone] if self.out_stages is None else self.out_stages
        try:
            stages = tuple(int(s) for s in stages)
        except (TypeError, ValueError):
            fail("out_stages", f"must be a sequence of stage numbers, got {self.out_stages!r}")
        if self.backbone == "shufflenetv2":
            valid = tuple(SHUFFLENET_STAGE_STRIDES)
        else:
            valid = tuple(range(len(GHOSTNET_STAGES) + 1))
        if not stages or list(stages) != sorted(set(stages)) or not set(stages) <= set(valid):
            fail("out_stages", f"must be increasing stage numbers of {valid} for {self.backbone}, got {stages}")
        object.__setattr__(self, "out_stages", stages)

        # neck
        one_of("neck", NECKS)
        positive_int("neck_channels")
        if self.neck == "ghost_pan":
            activation("neck_activation")
        elif self.neck_activation is not None:
            activation("neck_activation")
        positive_int("neck_kernel_size")
        if self.neck_kernel_size % 2 == 0:
            fail("neck_kernel_size", f"must be odd (padding k//2 keeps the size), got {self.neck_kernel_size}")
        positive_int("num_extra_level", minimum=0)
        if self.neck == "pan" and self.num_extra_level:
            fail("num_extra_level", f"NanoDet's PAN outputs one level per input and no extra level; "
                                    f"must be 0, got {self.num_extra_level}")
        if self.num_extra_level > 1:
            # every extra level adds extra_lvl_in_conv(the top input, stride 32 -> 64) to
            # extra_lvl_out_conv(the last level): from the second on the two differ in size
            fail("num_extra_level", f"GhostPAN's second extra level adds a stride-64 map to a stride-128 "
                                    f"one and fails in NanoDet; must be 0 or 1, got {self.num_extra_level}")
        boolean("use_depthwise")
        boolean("use_res")
        positive_int("num_blocks")
        if self.num_blocks != 1:
            # GhostBlocks builds every block with in_channels (2C), but from the second on they read C
            fail("num_blocks", f"GhostBlocks gives every block GhostPAN's 2*C input channels, so a second block "
                               f"fails in NanoDet; must be 1, got {self.num_blocks}")
        if isinstance(self.expand, bool) or not isinstance(self.expand, (int, float)) or not self.expand > 0:
            fail("expand", f"must be a positive number, got {self.expand!r}")
        if self.neck == "ghost_pan":
            # GhostModule returns 2*ceil(c/2) channels (NanoDet does not slice): odd counts break it
            mid = int(self.neck_channels * self.expand)
            if self.neck_channels % 2 or mid % 2 or mid < 2:
                fail("neck_channels", f"GhostPAN's ghost modules need an even neck_channels and an even "
                                      f"int(neck_channels * expand) >= 2, got {self.neck_channels} and {mid}")

        # head
        one_of("head", HEADS)
        positive_int("num_classes")
        positive_int("head_feat_channels")
        positive_int("stacked_convs", minimum=0)
        positive_int("head_kernel_size")
        if self.head_kernel_size % 2 == 0:
            fail("head_kernel_size", f"must be odd (padding k//2 keeps the size), got {self.head_kernel_size}")
        if self.head == "nanodet" and self.head_kernel_size != LEGACY_HEAD_KERNEL:
            fail("head_kernel_size", f"NanoDetHead's convs are {LEGACY_HEAD_KERNEL}x{LEGACY_HEAD_KERNEL} "
                                     f"(hard-coded); must be {LEGACY_HEAD_KERNEL}, got {self.head_kernel_size}")
        activation("head_activation")
        boolean("share_cls_reg")
        if self.head == "nanodet_plus" and not self.share_cls_reg:
            fail("share_cls_reg", "NanoDetPlusHead has one branch for classes and boxes; must be True")
        one_of("head_conv_type", HEAD_CONV_TYPES)
        positive_int("reg_max", minimum=0)
        if self.stacked_convs == 0 and self.head_feat_channels != self.neck_channels:
            fail("head_feat_channels", f"with stacked_convs 0 the head's 1x1 convs read the neck's "
                                       f"{self.neck_channels} channels; got {self.head_feat_channels}")
        boolean("folded")

        # the levels: one stride per neck output, each the real stride of that level
        try:
            strides = tuple(int(s) for s in self.strides)
        except (TypeError, ValueError):
            fail("strides", f"must be a sequence of integers, got {self.strides!r}")
        expected = level_strides(self)
        if any(b != 2 * a for a, b in zip(expected, expected[1:])):
            fail("out_stages", f"the neck upsamples each level x2 onto the one before; the backbone outputs "
                               f"of out_stages {self.out_stages} have strides {backbone_strides(self)}")
        if strides != expected:
            fail("strides", f"the neck's {len(expected)} outputs ({len(self.out_stages)} backbone levels + "
                            f"{self.num_extra_level} extra) have strides {expected}, got {strides}")
        object.__setattr__(self, "strides", strides)

    @property
    def num_outputs(self) -> int:
        """Channels of the head's output per prior: class scores then 4 x (reg_max + 1) box bins."""
        return self.num_classes + 4 * (self.reg_max + 1)

    def ghostnet_config(self) -> GhostNetConfig:
        """The :class:`refghost.arch.Config` of the GhostNet backbone (backbone "ghostnet" only)."""
        if self.backbone != "ghostnet":
            raise RefghostError(f"DetectorConfig.backbone is {self.backbone!r}, not 'ghostnet'")
        return GhostNetConfig(arch="nanodet", width=self.backbone_width, activation=self.backbone_activation,
                              out_stages=self.out_stages, folded=self.folded)


# --- the backbone's outputs --------------------------------------------------------------


def _ghostnet_stage_strides() -> tuple[int, ...]:
    """Stride of each GhostNet stage's output (0..9): the stem halves, then each row's stride."""
    stride, strides = 2, []
    for rows in GHOSTNET_STAGES:
        for row in rows:
            stride *= row.stride
        strides.append(stride)
    return tuple(strides + [stride])  # stage 9, the final 1x1 conv


def backbone_strides(config: DetectorConfig) -> tuple[int, ...]:
    """The stride of each backbone output (one per ``out_stages`` entry)."""
    if config.backbone == "shufflenetv2":
        return tuple(SHUFFLENET_STAGE_STRIDES[s] for s in config.out_stages)
    table = _ghostnet_stage_strides()
    return tuple(table[s] for s in config.out_stages)


def backbone_channels(config: DetectorConfig) -> tuple[int, ...]:
    """The channels of each backbone output: the neck's ``in_channels`` in NanoDet's config."""
    if config.backbone == "shufflenetv2":
        table = SHUFFLENET_CHANNELS[config.backbone_width]
        return tuple(table[s - 1] for s in config.out_stages)
    width = config.backbone_width
    per_stage = [make_divisible(rows[-1].out * width) for rows in GHOSTNET_STAGES]
    per_stage.append(make_divisible(GHOSTNET_STAGES[-1][-1].mid * width))
    return tuple(per_stage[s] for s in config.out_stages)


def level_strides(config: DetectorConfig) -> tuple[int, ...]:
    """The stride of each neck output: the backbone's, then each extra level doubling the last."""
    strides = backbone_strides(config)
    return strides + tuple(strides[-1] * 2 ** (i + 1) for i in range(config.num_extra_level))


# --- sizes -------------------------------------------------------------------------------


class LevelSize(NamedTuple):
    """A feature level's stride and the height and width of its map."""

    stride: int
    height: int
    width: int


def _backbone_sizes(config: DetectorConfig, size: int) -> dict[int, int]:
    """{stage: length} of every backbone stage output along one axis of length ``size``."""
    out = {}
    if config.backbone == "shufflenetv2":
        size = conv_output_size(size, 3, 2, 1)  # conv1
        size = conv_output_size(size, 3, 2, 1)  # maxpool (floor mode: the same formula)
        for stage, stride in SHUFFLENET_STAGE_STRIDES.items():
            size = conv_output_size(size, 3, 2, 1)  # the stage's first block, stride 2
            out[stage] = size
        return out
    size = conv_output_size(size, 3, 2, 1)  # conv_stem
    for stage, rows in enumerate(GHOSTNET_STAGES):
        for row in rows:
            if row.stride > 1:
                size = conv_output_size(size, row.kernel, row.stride, (row.kernel - 1) // 2)
        out[stage] = size
    out[len(GHOSTNET_STAGES)] = size
    return out


def level_sizes(config: DetectorConfig, width: int, height: int) -> tuple[LevelSize, ...]:
    """The size of each neck output (one per stride) for an input of ``width`` x ``height``.

    The sizes the network produces: every stride-2 conv or pool maps a length L to
    ``floor((L + 2p - k)/2) + 1`` (``ceil(L/2)`` for NanoDet's k, p), and each extra level is
    the neck's stride-2 kxk conv of the last level. 320 x 320 gives 40, 20, 10, 5 for
    NanoDet-Plus; 416 x 416 gives 52, 26, 13, 7.

    The neck upsamples level l+1 by two onto level l (GhostPAN concatenates, PAN adds) and PAN
    also halves level l by bilinear x0.5 onto l+1, so level l must be exactly twice level l+1:
    for strides 8, 16, 32 that is a side of 32k-7 .. 32k. Other sizes make NanoDet fail with a
    size mismatch, and raise :class:`RefghostError` here.
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RefghostError(f"input {name} must be a positive integer, got {value!r}")
    axes = []
    for name, length in (("height", height), ("width", width)):
        per_stage = _backbone_sizes(config, length)
        sizes = [per_stage[s] for s in config.out_stages]
        for a, b in zip(sizes, sizes[1:]):
            if a != 2 * b:
                raise RefghostError(
                    f"input {name} {length}: the backbone levels are {sizes} long, but the neck needs each "
                    f"level twice the next (x2 upsampling); use a multiple of {backbone_strides(config)[-1]}")
        k = config.neck_kernel_size
        for _ in range(config.num_extra_level):
            sizes.append(conv_output_size(sizes[-1], k, 2, k // 2))
        axes.append(sizes)
    return tuple(LevelSize(s, h, w) for s, h, w in zip(config.strides, *axes))


def num_priors(config: DetectorConfig, width: int, height: int) -> int:
    """The number of prior points (rows of the head's output): the sum of H*W over the levels."""
    return sum(level.height * level.width for level in level_sizes(config, width, height))


# --- named configurations ----------------------------------------------------------------

_PLUS_M = DetectorConfig()
_LEGACY_M = DetectorConfig(neck="pan", neck_activation=None, num_extra_level=0, head="nanodet",
                           head_kernel_size=LEGACY_HEAD_KERNEL, strides=(8, 16, 32))

#: Named configurations. ``nanodet-plus-m*`` are NanoDet's ``config/nanodet-plus-m*.yml`` (the
#: 320 and 416 configs differ only in input size, which is not part of a DetectorConfig);
#: ``nanodet-m`` is ``config/legacy_v0.x_configs/nanodet-m.yml``. NanoDet ships no GhostNet
#: detector: ``ghostnet-ghostpan-plus`` is refghost's GhostNet 1.0x (ReLU, out_stages 4, 6, 9:
#: 40, 112, 960 channels) under NanoDet-Plus-m's GhostPAN and head, ``ghostnet-pan-nanodet`` the
#: same backbone under nanodet-m's PAN and head (the community recipe of RangiLyu/nanodet#78).
PRESETS: dict[str, DetectorConfig] = {
    "nanodet-plus-m_320": _PLUS_M,
    "nanodet-plus-m_416": _PLUS_M,
    "nanodet-plus-m-1.5x_320": replace(_PLUS_M, backbone_width=1.5, neck_channels=128, head_feat_channels=128),
    "nanodet-plus-m-1.5x_416": replace(_PLUS_M, backbone_width=1.5, neck_channels=128, head_feat_channels=128),
    "ghostnet-ghostpan-plus": replace(_PLUS_M, backbone="ghostnet", backbone_activation="ReLU", out_stages=None),
    "nanodet-m": _LEGACY_M,
    "ghostnet-pan-nanodet": replace(_LEGACY_M, backbone="ghostnet", backbone_activation="ReLU", out_stages=None),
}
