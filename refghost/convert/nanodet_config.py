"""NanoDet's own YAML config (``config/nanodet-plus-m_320.yml`` upstream) as refghost settings.

NanoDet trains, evaluates and exports a detector from one YAML file, which it loads with yacs
(``yaml.safe_load`` underneath). :func:`read_nanodet_config` reads the same file the same way and
keeps what inference needs (:class:`NanoDetSettings`):

* ``model.arch.backbone`` / ``fpn`` / ``head``: the architecture, as a
  :class:`~refghost.detector.spec.DetectorConfig`. Backbones ``ShuffleNetV2`` (``model_size``
  "0.5x".."2.0x") and ``GhostNet`` (``width_mult``); necks ``GhostPAN`` and ``PAN``; heads
  ``NanoDetPlusHead`` and ``NanoDetHead``; activations as NanoDet spells them. An option left
  out takes the default of NanoDet's constructor (not refghost's): ShuffleNetV2 is 1.5x with
  ReLU, GhostPAN has ``use_depthwise`` False and no extra level, NanoDetHead has ``reg_max`` 16.
* ``data.val.input_size`` ``[w, h]`` (with ``keep_ratio`` False, a size the detector's levels
  fit: :func:`~refghost.detector.spec.level_sizes`), ``data.val.keep_ratio`` (NanoDet's
  default: True) and the val pipeline's ``normalize: [[mean], [std]]`` (0..255 scale, in the
  BGR order NanoDet feeds its OpenCV images);
* ``class_names``.

What changes the inference network and refghost does not build (another backbone, GroupNorm,
``with_last_conv``, nearest upsampling...) is refused with a :class:`~refghost.errors.RefghostError`
naming the key and its value. A backbone or neck option NanoDet's constructor does not take is
refused too (NanoDet would fail on it); a head ignores unknown options, as NanoDet's heads do
(they take ``**kwargs``). Training-only settings are ignored: losses, assigners, the
``aux_head``, ``detach_epoch``, ``weight_averager``, ``pretrain``, the train pipeline, schedule.
The config must also agree with itself: the neck's ``in_channels`` are the backbone outputs'
channels, the head's ``input_channel`` is the neck's ``out_channels``, one head stride per level.

Safety: the file is read whole only if it is at most :data:`MAX_CONFIG_BYTES` (a config is a few
KB); it is parsed with ``yaml.safe_load`` only (plain data: no Python objects), after a pass over
the parser's events that refuses nesting deeper than :data:`MAX_DEPTH` (the event parser is
iterative; the constructor that follows recurses).

PyYAML is the optional extra ``refghost[config]``; it is imported only when a config is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..detector.spec import SHUFFLENET_CHANNELS, DetectorConfig, backbone_channels, level_sizes
from ..errors import RefghostError

__all__ = ["NanoDetSettings", "read_nanodet_config", "MAX_CONFIG_BYTES", "MAX_DEPTH"]

#: Largest config file read: NanoDet's are 2-4 KB, with 80 class names.
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of mappings and sequences accepted (NanoDet's configs nest 5 deep).
MAX_DEPTH = 32

#: ``model.arch.name`` values: NanoDet-Plus, and the v0.x one-stage detector (``GFL`` is its old name).
ARCH_NAMES = ("NanoDetPlus", "OneStageDetector", "GFL")
#: ShuffleNetV2's ``model_size`` strings and the width each names.
SHUFFLENET_SIZES = {f"{w:.1f}x": w for w in SHUFFLENET_CHANNELS}

_REQUIRED = object()

#: Per component (NanoDet's class name): each option its constructor takes, with NanoDet's default
#: (``_REQUIRED``: no default), as in ``nanodet/model/backbone/shufflenetv2.py``, ``ghostnet.py``,
#: ``fpn/ghost_pan.py``, ``fpn/pan.py``, ``head/nanodet_plus_head.py``, ``head/nanodet_head.py``.
OPTIONS = {
    "ShuffleNetV2": {"model_size": "1.5x", "out_stages": (2, 3, 4), "with_last_conv": False, "kernal_size": 3,
                     "activation": "ReLU", "pretrain": True},
    "GhostNet": {"width_mult": 1.0, "out_stages": (4, 6, 9), "activation": "ReLU", "pretrain": True, "act": None},
    "GhostPAN": {"in_channels": _REQUIRED, "out_channels": _REQUIRED, "use_depthwise": False, "kernel_size": 5,
                 "expand": 1, "num_blocks": 1, "use_res": False, "num_extra_level": 0,
                 "upsample_cfg": {"scale_factor": 2, "mode": "bilinear"}, "norm_cfg": {"type": "BN"},
                 "activation": "LeakyReLU"},
    "PAN": {"in_channels": _REQUIRED, "out_channels": _REQUIRED, "num_outs": _REQUIRED, "start_level": 0,
            "end_level": -1, "conv_cfg": None, "norm_cfg": None, "activation": None},
    "NanoDetPlusHead": {"num_classes": _REQUIRED, "input_channel": _REQUIRED, "feat_channels": 96,
                        "stacked_convs": 2, "kernel_size": 5, "strides": (8, 16, 32), "conv_type": "DWConv",
                        "norm_cfg": {"type": "BN"}, "reg_max": 7, "activation": "LeakyReLU"},
    "NanoDetHead": {"num_classes": _REQUIRED, "input_channel": _REQUIRED, "feat_channels": 256,
                    "stacked_convs": 2, "conv_type": "DWConv", "conv_cfg": None, "norm_cfg": {"type": "BN"},
                    "reg_max": 16, "share_cls_reg": False, "activation": "LeakyReLU", "strides": (8, 16, 32)},
}
#: Options that only matter for training (or for loading ImageNet weights): read, never used.
IGNORED = {
    "ShuffleNetV2": ("pretrain", "kernal_size"),  # kernal_size is stored but every conv is 3x3
    "GhostNet": ("pretrain",),
    "GhostPAN": (),
    "PAN": ("num_outs",),  # PAN returns one level per input whatever num_outs says (>= inputs)
    "NanoDetPlusHead": ("loss", "assigner_cfg"),
    "NanoDetHead": ("loss", "octave_base_scale", "scales_per_octave", "ignore_iof_thr"),
}
_KIND = {"backbone": ("ShuffleNetV2", "GhostNet"), "fpn": ("GhostPAN", "PAN"),
         "head": ("NanoDetPlusHead", "NanoDetHead")}
_REFGHOST_NAME = {"ShuffleNetV2": "shufflenetv2", "GhostNet": "ghostnet", "GhostPAN": "ghost_pan", "PAN": "pan",
                  "NanoDetPlusHead": "nanodet_plus", "NanoDetHead": "nanodet"}
_BUILDS = {"backbone": "ShuffleNetV2 and GhostNet backbones", "fpn": "GhostPAN and PAN necks",
           "head": "NanoDetPlusHead and NanoDetHead heads"}
#: Where each DetectorConfig field comes from, to name the YAML key when the config refuses it.
_FIELD_KEYS = {
    "backbone_width": "backbone.model_size/width_mult", "backbone_activation": "backbone.activation",
    "out_stages": "backbone.out_stages", "neck_channels": "fpn.out_channels", "neck_activation": "fpn.activation",
    "neck_kernel_size": "fpn.kernel_size", "num_extra_level": "fpn.num_extra_level",
    "use_depthwise": "fpn.use_depthwise", "expand": "fpn.expand", "num_blocks": "fpn.num_blocks",
    "use_res": "fpn.use_res", "num_classes": "head.num_classes", "head_feat_channels": "head.feat_channels",
    "stacked_convs": "head.stacked_convs", "head_kernel_size": "head.kernel_size",
    "head_activation": "head.activation", "share_cls_reg": "head.share_cls_reg",
    "head_conv_type": "head.conv_type", "reg_max": "head.reg_max", "strides": "head.strides",
}


@dataclass(frozen=True)
class NanoDetSettings:
    """What a NanoDet config says about inference.

    ``detector`` the architecture; ``input_size`` ``(width, height)`` of the network input;
    ``keep_ratio`` NanoDet's resize mode (False: stretch to ``input_size``; True: keep the aspect
    ratio, rounded up to a multiple of 32); ``mean`` and ``std`` per input channel in BGR order,
    0..255 scale (``(pixel - mean) / std``); ``class_names`` (empty when the config has none);
    ``source`` the file read.
    """

    detector: DetectorConfig
    input_size: tuple[int, int]
    keep_ratio: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    source: str


def read_nanodet_config(path) -> NanoDetSettings:
    """Read NanoDet YAML config ``path`` (see the module docstring). Raises RefghostError."""
    source = os.fspath(path)
    document = _load_yaml(source)
    r = _Reader(source)
    model = r.mapping(document.get("model", _REQUIRED), "model")
    arch = r.mapping(model.get("arch", _REQUIRED), "model.arch")
    name = r.present(arch.get("name", _REQUIRED), "model.arch.name")
    if name not in ARCH_NAMES:
        r.fail("model.arch.name", f"is {_shown(name)}, not supported: refghost builds "
                                  f"{', '.join(ARCH_NAMES)} (NanoDet-Plus and the v0.x detector)")
    parts = {part: r.component(arch.get(part, _REQUIRED), part) for part in ("backbone", "fpn", "head")}
    fields = {**r.backbone_fields(*parts["backbone"]), **r.fpn_fields(*parts["fpn"]),
              **r.head_fields(*parts["head"])}
    detector = r.detector_config(fields)
    r.check_consistency(detector, parts)

    data = r.mapping(document.get("data", _REQUIRED), "data")
    val = r.mapping(data.get("val", _REQUIRED), "data.val")
    size = r.ints(val.get("input_size", _REQUIRED), "data.val.input_size", length=2)
    keep_ratio = r.boolean(val.get("keep_ratio", True), "data.val.keep_ratio")
    if not keep_ratio:  # the network input is input_size itself (keep_ratio: a multiple of 32, always fits)
        try:
            level_sizes(detector, size[0], size[1])
        except RefghostError as exc:
            r.fail("data.val.input_size", f"is {list(size)}, which the detector cannot take: {exc}")
    pipeline = r.mapping(val.get("pipeline", _REQUIRED), "data.val.pipeline")
    mean, std = r.normalize(pipeline.get("normalize", _REQUIRED), "data.val.pipeline.normalize")
    names = r.class_names(document.get("class_names", ()), detector.num_classes)
    return NanoDetSettings(detector=detector, input_size=(size[0], size[1]), keep_ratio=keep_ratio,
                           mean=mean, std=std, class_names=names, source=source)


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------
def _import_yaml():
    try:
        import yaml
    except ImportError:
        raise RefghostError("reading a NanoDet config needs PyYAML: pip install \"refghost[config]\" "
                            "(or pip install pyyaml)") from None
    return yaml


def _load_yaml(source: str) -> dict:
    """The config's top-level mapping, parsed with ``yaml.safe_load`` within the size and depth bounds."""
    yaml = _import_yaml()
    try:
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise RefghostError(f"{source}: {size} bytes; a NanoDet config is a few KB, refusing more than "
                                    f"{MAX_CONFIG_BYTES} bytes (is this the config file?)")
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise RefghostError(f"{source}: cannot read the config ({exc.strerror or exc})") from None
    if len(text) > MAX_CONFIG_BYTES:  # grew while being read
        raise RefghostError(f"{source}: more than {MAX_CONFIG_BYTES} bytes; refusing it")
    if b"\x00" in text[:4096] and not text.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RefghostError(f"{source}: not a YAML config (binary data; a checkpoint given as --config?)")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RefghostError(f"{source}: nested more than {MAX_DEPTH} levels deep; not a NanoDet config")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RefghostError(f"{source}: not a valid YAML config{at}: {problem}") from None
    except RecursionError:  # deep aliases the depth pass cannot see
        raise RefghostError(f"{source}: nested too deeply; not a NanoDet config") from None
    if not isinstance(document, dict):
        raise RefghostError(f"{source}: not a NanoDet config: the top level is {_type_name(document)}, expected "
                            f"a mapping with 'model' and 'data' (as config/nanodet-plus-m_320.yml)")
    return document


# --------------------------------------------------------------------------------------------
# Reading values: each refusal names the file, the key and the value
# --------------------------------------------------------------------------------------------
def _type_name(value) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _shown(value) -> str:
    if value is _REQUIRED:
        return "missing"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    """Typed access to the parsed YAML; every refusal is a RefghostError naming source and key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str):
        raise RefghostError(f"{self.source}: {key} {problem}")

    def present(self, value, key: str):
        if value is _REQUIRED:
            self.fail(key, "is missing (NanoDet's config has it; see config/nanodet-plus-m_320.yml)")
        return value

    def mapping(self, value, key: str) -> dict:
        value = self.present(value, key)
        if not isinstance(value, dict):
            self.fail(key, f"is {_type_name(value)}, expected a mapping")
        return value

    def integer(self, value, key: str, minimum: int | None = 1) -> int:
        value = self.present(value, key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"is {_shown(value)}, expected an integer")
        if minimum is not None and value < minimum:
            self.fail(key, f"is {value}, expected an integer >= {minimum}")
        return value

    def ints(self, value, key: str, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
        value = self.present(value, key)
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            self.fail(key, f"is {_shown(value)}, expected a list of {length or 'some'} integers")
        return tuple(self.integer(v, f"{key}[{i}]", minimum) for i, v in enumerate(value))

    def number(self, value, key: str) -> float:
        value = self.present(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"is {_shown(value)}, expected a finite number")
        return float(value)

    def boolean(self, value, key: str) -> bool:
        value = self.present(value, key)
        if not isinstance(value, bool):
            self.fail(key, f"is {_shown(value)}, expected True or False")
        return value

    def name(self, value, key: str, allow_none: bool = False) -> str | None:
        value = self.present(value, key)
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            self.fail(key, f"is {_shown(value)}, expected a name")
        return value

    # --- the architecture ----------------------------------------------------------------
    def component(self, section, part: str) -> tuple[str, dict]:
        """(NanoDet class name, {option: value or NanoDet's default}) of ``model.arch.<part>``."""
        key = f"model.arch.{part}"
        section = self.mapping(section, key)
        kind = self.present(section.get("name", _REQUIRED), f"{key}.name")
        if kind not in _KIND[part]:
            self.fail(f"{key}.name", f"{_shown(kind)} is not supported: refghost builds {_BUILDS[part]}")
        table = OPTIONS[kind]
        options = {}
        for option, value in section.items():
            if option == "name" or option in IGNORED[kind]:
                continue
            if option not in table:
                if part == "head":  # NanoDet's heads take **kwargs and ignore what they do not know
                    continue
                self.fail(f"{key}.{option}", f"is not an option of NanoDet's {kind} (its options: "
                                             f"{', '.join(table)})")
            options[option] = value
        for option, default in table.items():
            if option not in options and option not in IGNORED[kind]:
                if default is _REQUIRED:
                    self.fail(f"{key}.{option}", f"is missing; NanoDet's {kind} needs it")
                options[option] = default
        if part == "head" and "loss" in section:
            self._check_loss(section["loss"], key)
        return kind, options

    def _check_loss(self, loss, key: str) -> None:
        """GFL's ``use_sigmoid: False`` adds a background class (softmax scores): not built."""
        if isinstance(loss, dict) and isinstance(loss.get("loss_qfl"), dict):
            if loss["loss_qfl"].get("use_sigmoid", True) is not True:
                self.fail(f"{key}.loss.loss_qfl.use_sigmoid", f"is {_shown(loss['loss_qfl']['use_sigmoid'])}, not "
                          f"supported: refghost builds sigmoid class scores (use_sigmoid True, as every NanoDet "
                          f"config)")

    def activation(self, value, key: str, allow_none: bool = False) -> str | None:
        return self.name(value, key, allow_none=allow_none)

    def norm(self, value, key: str, batch_norm: bool) -> None:
        """``norm_cfg``: BatchNorm (``BN``/``SyncBN``, eps 1e-5) where refghost builds it, else None."""
        if not batch_norm:
            if value is not None:
                self.fail(key, f"is {_shown(value)}, not supported: NanoDet's PAN configs have no norm "
                               f"(its lateral convs have a bias); refghost builds that")
            return
        if value is None:
            self.fail(key, "is empty (no norm), not supported: refghost builds these convs with BatchNorm, as "
                           "every NanoDet config")
        value = self.mapping(value, key)
        kind = value.get("type", _REQUIRED)
        if kind not in ("BN", "SyncBN"):
            self.fail(f"{key}.type", f"is {_shown(kind)}, not supported: refghost builds BatchNorm (BN)")
        eps = value.get("eps", 1e-5)
        if self.number(eps, f"{key}.eps") != 1e-5:
            self.fail(f"{key}.eps", f"is {eps}, not supported: refghost's BatchNorm has PyTorch's eps 1e-5")

    def backbone_fields(self, kind: str, o: dict) -> dict:
        key = "model.arch.backbone"
        if kind == "ShuffleNetV2":
            size = o["model_size"]
            if size not in SHUFFLENET_SIZES:
                self.fail(f"{key}.model_size", f"is {_shown(size)}; ShuffleNetV2 exists as "
                                               f"{', '.join(SHUFFLENET_SIZES)}")
            if self.boolean(o["with_last_conv"], f"{key}.with_last_conv"):
                self.fail(f"{key}.with_last_conv", "is True, not supported: refghost builds ShuffleNetV2 without "
                                                   "conv5 (with_last_conv False, as every NanoDet config)")
            width = SHUFFLENET_SIZES[size]
            activation = o["activation"]
        else:
            width = self.number(o["width_mult"], f"{key}.width_mult")
            activation = o["activation"] if o["act"] is None else o["act"]  # act: NanoDet's deprecated alias
        return {"backbone": _REFGHOST_NAME[kind], "backbone_width": width,
                "backbone_activation": self.activation(activation, f"{key}.activation"),
                "out_stages": self.ints(o["out_stages"], f"{key}.out_stages", minimum=0)}

    def fpn_fields(self, kind: str, o: dict) -> dict:
        key = "model.arch.fpn"
        fields = {"neck": _REFGHOST_NAME[kind], "neck_channels": self.integer(o["out_channels"], f"{key}.out_channels")}
        self.ints(o["in_channels"], f"{key}.in_channels")
        if kind == "PAN":
            self.norm(o["norm_cfg"], f"{key}.norm_cfg", batch_norm=False)
            if o["conv_cfg"] is not None:
                self.fail(f"{key}.conv_cfg", f"is {_shown(o['conv_cfg'])}, not supported: refghost builds plain "
                                             f"convolutions (conv_cfg None)")
            if self.integer(o["start_level"], f"{key}.start_level", minimum=0) != 0:
                self.fail(f"{key}.start_level", f"is {o['start_level']}, not supported: the neck reads every "
                                                f"backbone output (start_level 0); drop the unused out_stages instead")
            end = self.integer(o["end_level"], f"{key}.end_level", minimum=None)
            if end not in (-1, len(o["in_channels"])):
                self.fail(f"{key}.end_level", f"is {end}, not supported: the neck reads every backbone output "
                                              f"(end_level -1)")
            fields["neck_activation"] = self.activation(o["activation"], f"{key}.activation", allow_none=True)
            fields["num_extra_level"] = 0
            return fields
        self.norm(o["norm_cfg"], f"{key}.norm_cfg", batch_norm=True)
        up = self.mapping(o["upsample_cfg"], f"{key}.upsample_cfg")
        if (up.get("scale_factor") != 2 or up.get("mode") != "bilinear" or up.get("align_corners", False)
                or set(up) - {"scale_factor", "mode", "align_corners"}):
            self.fail(f"{key}.upsample_cfg", f"is {_shown(up)}, not supported: refghost builds GhostPAN's "
                                             f"default, bilinear x2 with align_corners False")
        fields.update(
            neck_activation=self.activation(o["activation"], f"{key}.activation"),
            neck_kernel_size=self.integer(o["kernel_size"], f"{key}.kernel_size"),
            num_extra_level=self.integer(o["num_extra_level"], f"{key}.num_extra_level", minimum=0),
            use_depthwise=self.boolean(o["use_depthwise"], f"{key}.use_depthwise"),
            expand=self.number(o["expand"], f"{key}.expand"),
            num_blocks=self.integer(o["num_blocks"], f"{key}.num_blocks"),
            use_res=self.boolean(o["use_res"], f"{key}.use_res"))
        if fields["expand"].is_integer():
            fields["expand"] = int(fields["expand"])
        return fields

    def head_fields(self, kind: str, o: dict) -> dict:
        key = "model.arch.head"
        self.norm(o["norm_cfg"], f"{key}.norm_cfg", batch_norm=True)
        if o.get("conv_cfg") is not None:
            self.fail(f"{key}.conv_cfg", f"is {_shown(o['conv_cfg'])}, not supported: refghost builds plain "
                                         f"convolutions (conv_cfg None)")
        fields = {
            "head": _REFGHOST_NAME[kind],
            "num_classes": self.integer(o["num_classes"], f"{key}.num_classes"),
            "head_feat_channels": self.integer(o["feat_channels"], f"{key}.feat_channels"),
            "stacked_convs": self.integer(o["stacked_convs"], f"{key}.stacked_convs", minimum=0),
            "head_activation": self.activation(o["activation"], f"{key}.activation"),
            "head_conv_type": self.name(o["conv_type"], f"{key}.conv_type"),
            "reg_max": self.integer(o["reg_max"], f"{key}.reg_max", minimum=0),
            "strides": self.ints(o["strides"], f"{key}.strides"),
        }
        self.integer(o["input_channel"], f"{key}.input_channel")
        if kind == "NanoDetPlusHead":
            fields["head_kernel_size"] = self.integer(o["kernel_size"], f"{key}.kernel_size")
        else:
            fields["share_cls_reg"] = self.boolean(o["share_cls_reg"], f"{key}.share_cls_reg")
            fields["head_kernel_size"] = 3  # NanoDetHead's convs are 3x3 whatever the config says
        return fields

    def detector_config(self, fields: dict) -> DetectorConfig:
        """The DetectorConfig of ``fields``; a field it refuses is reported under its YAML key."""
        try:
            return DetectorConfig(**fields)
        except RefghostError as exc:
            text = str(exc)
            prefix = "DetectorConfig."
            if text.startswith(prefix):
                field, _, problem = text[len(prefix):].partition(": ")
                if field in _FIELD_KEYS:
                    raise RefghostError(f"{self.source}: model.arch.{_FIELD_KEYS[field]}: {problem}") from None
            raise RefghostError(f"{self.source}: model.arch: {text}") from None

    def check_consistency(self, detector: DetectorConfig, parts: dict) -> None:
        """The neck reads the backbone's outputs, the head reads the neck's: the config's numbers agree."""
        fpn, head = parts["fpn"][1], parts["head"][1]
        channels = backbone_channels(detector)
        if tuple(fpn["in_channels"]) != channels:
            self.fail("model.arch.fpn.in_channels", f"is {list(fpn['in_channels'])}, but the backbone "
                      f"({parts['backbone'][0]} width {detector.backbone_width:g}, out_stages "
                      f"{list(detector.out_stages)}) outputs {list(channels)} channels")
        if head["input_channel"] != detector.neck_channels:
            self.fail("model.arch.head.input_channel", f"is {head['input_channel']}, but the neck outputs "
                      f"{detector.neck_channels} channels (model.arch.fpn.out_channels)")

    # --- data ----------------------------------------------------------------------------
    def normalize(self, value, key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        value = self.present(value, key)
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            self.fail(key, f"is {_shown(value)}, expected [[mean x3], [std x3]] (0..255, BGR)")
        mean = tuple(self.number(v, f"{key}[0][{i}]") for i, v in enumerate(self._three(value[0], f"{key}[0]")))
        std = tuple(self.number(v, f"{key}[1][{i}]") for i, v in enumerate(self._three(value[1], f"{key}[1]")))
        if any(s <= 0 for s in std):
            self.fail(f"{key}[1]", f"is {list(std)}; a std must be positive")
        return mean, std

    def _three(self, value, key: str) -> list:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            self.fail(key, f"is {_shown(value)}, expected 3 numbers (one per BGR channel)")
        return list(value)

    def class_names(self, value, num_classes: int) -> tuple[str, ...]:
        key = "class_names"
        if value is None or value == ():
            return ()
        if not isinstance(value, (list, tuple)):
            self.fail(key, f"is {_type_name(value)}, expected a list of names")
        names = []
        for i, name in enumerate(value):
            if isinstance(name, bool):
                self.fail(f"{key}[{i}]", f"is the boolean {name} (YAML reads yes/no/on/off/true/false "
                                         f"unquoted as booleans); quote the name")
            if not isinstance(name, (str, int, float)):
                self.fail(f"{key}[{i}]", f"is {_type_name(name)}, expected a name")
            names.append(str(name))
        if len(names) != num_classes:
            self.fail(key, f"lists {len(names)} names but the head has {num_classes} classes "
                           f"(model.arch.head.num_classes)")
        return tuple(names)
