"""A NanoDet checkpoint as the whole detector's tensors: which copy, which keys, which architecture.

NanoDet saves three kinds of file (``nanodet/trainer/task.py``, ``nanodet/util/check_point.py``):

* a Lightning ``.ckpt`` (``model_last.ckpt``, ``model_best.ckpt``): ``state_dict`` holds the
  trained model under ``model.`` and, when the config has a ``weight_averager``, its EMA copy
  under ``avg_model.``;
* ``nanodet_model_best.pth``: ``{"state_dict": ...}`` with bare keys (the EMA weights if any);
* older ``model_best.pth`` files and user exports: a bare state_dict, sometimes under ``module.``.

:func:`select_detector_tensors` takes a state_dict as NanoDet's ``load_model_weight`` does before
evaluating or exporting (``tools/export_onnx.py``): the EMA ``avg_model.`` tensors replace the raw
``model.`` ones, the ``model.``/``module.`` prefix is stripped, leaving ``backbone.``, ``fpn.``,
``head.`` and NanoDet-Plus's training-only ``aux_fpn.``/``aux_head.`` (a copy of the neck and a
``SimpleConvHead`` that assign labels during training; ``nanodet/model/arch/nanodet_plus.py``).

:func:`detector_from_state_dict` then checks the tensors against
:func:`refghost.detector.graph.build_detector_graph` of the config (given, or inferred from the
shapes by :func:`infer_detector_config`) and keeps exactly the graph's keys. It drops, and reports
in :attr:`DetectorCheckpoint.dropped`, only what NanoDet's inference never reads: the raw copy
when the EMA one is used, ``aux_fpn``/``aux_head``, and the keys
:func:`~refghost.detector.graph.unread_state_dict_keys` lists (the legacy head's ``gfl_reg``
convs when ``share_cls_reg`` is set, built but unused; the ``Integral``'s bins buffer
``head.distribution_project.project``, whose shape and values are checked: it says reg_max);
BatchNorm's ``num_batches_tracked`` counters are dropped without a report. Any other key outside
the graph means the checkpoint and the config describe different networks, and is an error
naming it.

What a state_dict cannot say (see :func:`infer_detector_config`): the activations (no tensors),
and, for a NanoDet-Plus state_dict without the bins buffer, how the head's ``num_classes + 4 *
(reg_max + 1)`` outputs split. Those are assumed as NanoDet's configs have them, and listed in
:attr:`DetectorCheckpoint.assumed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..arch import STAGES as GHOSTNET_STAGES
from ..detector.graph import build_detector_graph, unread_state_dict_keys
from ..detector.spec import (DEFAULT_OUT_STAGES, PRESETS, SHUFFLENET_CHANNELS, SHUFFLENET_STAGE_STRIDES,
                             DetectorConfig, backbone_channels, level_strides)
from ..errors import RefghostError, WeightsError
from .onnx_width import recognise_width
from .state_dict import read_state_dict

__all__ = ["DetectorCheckpoint", "DroppedGroup", "select_detector_tensors", "infer_detector_config",
           "detector_from_state_dict", "read_detector_checkpoint", "preset_name"]

#: The EMA copy NanoDet evaluates and exports with, and the raw trained model (Lightning module paths).
EMA_PREFIX, MODEL_PREFIX = "avg_model.", "model."
#: The detector's own modules, and NanoDet-Plus's training-only ones.
DETECTOR_MODULES = ("backbone", "fpn", "head")
TRAINING_ONLY = {"aux_fpn": "NanoDet-Plus's training-only copy of the neck (label assignment)",
                 "aux_head": "NanoDet-Plus's training-only SimpleConvHead (label assignment)"}
#: BatchNorm's step counter: never read in eval mode, never reported.
COUNTER_SUFFIX = ".num_batches_tracked"
#: reg_max of every NanoDet-Plus config (8 bins per box side): assumed when the head's outputs
#: could split another way.
DEFAULT_REG_MAX = 7
#: The head's Integral buffer ``linspace(0, reg_max, reg_max + 1)``: its length says reg_max.
PROJECT_KEY = "head.distribution_project.project"
#: Activations assumed for a state_dict (which holds none): what NanoDet's configs use.
ASSUMED_ACTIVATIONS = {
    "shufflenetv2": ("LeakyReLU", "every NanoDet ShuffleNetV2 config sets LeakyReLU"),
    "ghostnet": ("ReLU", "NanoDet's GhostNet default"),
    "ghost_pan": ("LeakyReLU", "GhostPAN's default, as every NanoDet-Plus config"),
    "pan": (None, "PAN's default, as every v0.x config: plain 1x1 laterals"),
    "head": ("LeakyReLU", "the default of both NanoDet heads, as every config"),
}


@dataclass(frozen=True)
class DroppedGroup:
    """Keys of a checkpoint left out of the detector: ``group`` (a module path such as
    ``aux_head``, ``model`` or ``head.gfl_reg``), how many, an example and why."""

    group: str
    count: int
    example: str
    reason: str

    def __str__(self) -> str:
        return f"{self.group}.* ({self.count} tensor{'s' if self.count != 1 else ''}): {self.reason}"


@dataclass(frozen=True)
class DetectorCheckpoint:
    """A checkpoint read as a whole detector.

    ``config`` the architecture; ``tensors`` exactly the keys of
    ``build_detector_graph(config).param_shapes``, in that order, with those shapes;
    ``origin`` which copy they come from (``"avg_model (EMA)"``, ``"model"`` or ``"bare
    state_dict"``); ``dropped`` the groups of keys left out; ``assumed`` what inference could not
    read from the shapes (empty when the config was given).
    """

    config: DetectorConfig
    tensors: dict[str, np.ndarray]
    origin: str
    dropped: tuple[DroppedGroup, ...]
    assumed: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Which copy
# --------------------------------------------------------------------------------------------
def _group(key: str, depth: int = 1) -> str:
    return ".".join(key.split(".")[:depth])


def _dropped(keys, reason: str, depth: int = 1) -> list[DroppedGroup]:
    """``keys`` as DroppedGroups by their first ``depth`` path components, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_group(key, depth), []).append(key)
    return [DroppedGroup(g, len(ks), ks[0], reason) for g, ks in groups.items()]


def select_detector_tensors(state_dict: dict,
                            where: str = "<state_dict>") -> tuple[dict, str, tuple[DroppedGroup, ...]]:
    """``(tensors, origin, dropped)``: the detector's copy of a NanoDet state_dict, prefixes stripped.

    As NanoDet's ``load_model_weight``: ``avg_model.<k>`` (EMA) replaces ``model.<k>``, then a
    ``module.`` (DataParallel) and a ``model.`` prefix are stripped. ``tensors`` keeps
    ``backbone.``/``fpn.``/``head.`` keys; ``dropped`` lists the raw copy superseded by the EMA one
    and ``aux_fpn``/``aux_head``. A key of any other module is a WeightsError (not a NanoDet
    detector), as is a state_dict with none of the three.
    """
    dropped: list[DroppedGroup] = []
    keys = [k for k in state_dict if not k.endswith(COUNTER_SUFFIX)]
    ema = [k for k in keys if k.startswith(EMA_PREFIX)]
    if ema:
        from_ema = {MODEL_PREFIX + k[len(EMA_PREFIX):] for k in ema}
        sd, superseded, fallback = {}, [], 0
        for key in keys:  # in stored order
            if key.startswith(EMA_PREFIX):
                sd[MODEL_PREFIX + key[len(EMA_PREFIX):]] = state_dict[key]
            elif key in from_ema:
                superseded.append(key)
            else:
                sd[key] = state_dict[key]
                fallback += key.startswith(MODEL_PREFIX)
        if superseded:
            dropped.append(DroppedGroup("model", len(superseded), superseded[0],
                                        "the raw trained weights; NanoDet evaluates and exports the EMA copy "
                                        "avg_model.*, used instead"))
        origin = "avg_model (EMA)" + (f" and {fallback} tensors of model missing from it" if fallback else "")
    else:
        sd = {k: state_dict[k] for k in keys}
        origin = "model" if keys and keys[0].startswith(MODEL_PREFIX) else "bare state_dict"
    for prefix in ("module.", MODEL_PREFIX):  # load_model_weight looks at the first key, then strips all
        if sd and next(iter(sd)).startswith(prefix):
            sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    tensors, training_only, foreign = {}, [], []
    for key, value in sd.items():
        top = _group(key)
        if top in DETECTOR_MODULES:
            tensors[key] = value
        elif top in TRAINING_ONLY:
            training_only.append(key)
        else:
            foreign.append(key)
    for module, reason in TRAINING_ONLY.items():
        dropped += _dropped([k for k in training_only if _group(k) == module], reason)
    if not tensors:
        raise WeightsError(f"{where}: no detector tensors: no key starts with backbone., fpn. or head. (after "
                           f"avg_model./model./module.); first key {next(iter(sd), None)!r}")
    if foreign:
        raise WeightsError(f"{where}: key {foreign[0]!r} is not part of a NanoDet detector (its modules are "
                           f"backbone, fpn, head, and aux_fpn/aux_head in training)"
                           + (f"; {len(foreign)} such keys" if len(foreign) > 1 else ""))
    return tensors, origin, tuple(dropped)


# --------------------------------------------------------------------------------------------
# Which architecture
# --------------------------------------------------------------------------------------------
class _Taps(NamedTuple):
    """The backbone fields :func:`~refghost.detector.spec.backbone_channels` and
    :func:`~refghost.detector.spec.level_strides` read, before a whole DetectorConfig exists."""

    backbone: str
    backbone_width: float
    out_stages: tuple[int, ...]
    num_extra_level: int = 0


def _indices(keys, prefix: str) -> list[int]:
    """The sorted distinct integers ``i`` of keys ``<prefix><i>.…``."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _need(tensors: dict, key: str, where: str, what: str, ndim: int = 4) -> tuple[int, ...]:
    """The shape of ``tensors[key]``, which inference needs and must have ``ndim`` dimensions."""
    if key not in tensors:
        raise WeightsError(f"{where}: cannot infer {what}: key {key!r} is missing; pass the NanoDet config "
                           f"(--config, e.g. nanodet-plus-m_320.yml)")
    shape = tuple(int(d) for d in np.shape(tensors[key]))
    if len(shape) != ndim:
        raise WeightsError(f"{where}: key {key!r} has shape {list(shape)}; NanoDet's has {ndim} dimensions")
    return shape


def _all_stages(backbone: str) -> tuple[int, ...]:
    return tuple(SHUFFLENET_STAGE_STRIDES) if backbone == "shufflenetv2" else tuple(range(len(GHOSTNET_STAGES) + 1))


def _infer_backbone(tensors: dict, where: str) -> tuple[str, float]:
    keys = tensors.keys()
    if "backbone.conv_stem.weight" in tensors:
        shapes = [np.shape(v) for k, v in tensors.items() if k.startswith("backbone.") and np.ndim(v) == 4]
        return "ghostnet", recognise_width(shapes, arch="nanodet", where=f"{where} (backbone)")
    if "backbone.conv1.0.weight" in tensors:
        if any(k.startswith("backbone.stage4.conv5.") for k in keys):
            raise WeightsError(f"{where}: backbone.stage4.conv5 is ShuffleNetV2's last conv (with_last_conv True), "
                               f"not supported: refghost builds ShuffleNetV2 without it, as every NanoDet config")
        stages = []
        for stage in SHUFFLENET_STAGE_STRIDES:
            # the first block of a stage: branch1 and branch2 each give half the stage's channels
            stages.append(2 * _need(tensors, f"backbone.stage{stage}.0.branch1.2.weight", where, "the ShuffleNetV2 "
                                    "width")[0])
        for width, table in SHUFFLENET_CHANNELS.items():
            if tuple(table[1:]) == tuple(stages):
                return "shufflenetv2", width
        raise WeightsError(f"{where}: ShuffleNetV2 stages of {stages} channels match no model_size (0.5x..2.0x: "
                           f"{', '.join(str(list(t[1:])) for t in SHUFFLENET_CHANNELS.values())})")
    first = next((k for k in keys if k.startswith("backbone.")), None)
    raise WeightsError(f"{where}: cannot tell the backbone (first key {first!r}): neither GhostNet "
                       f"(backbone.conv_stem.weight) nor ShuffleNetV2 (backbone.conv1.0.weight); refghost builds "
                       f"ShuffleNetV2 and GhostNet backbones")


def _infer_out_stages(backbone: str, width: float, in_channels: list[int], where: str, assumed: list):
    """The backbone stages whose channels are the neck's ``in_channels`` (NanoDet's default taps
    where several stages have the same channels, as GhostNet's 3 and 4 do)."""
    stages = _all_stages(backbone)
    per_stage = dict(zip(stages, backbone_channels(_Taps(backbone, width, stages))))
    default = DEFAULT_OUT_STAGES[backbone]
    chosen, ambiguous = [], False
    for c in in_channels:
        later = [s for s, n in per_stage.items() if n == c and (not chosen or s > chosen[-1])]
        if not later:
            raise WeightsError(f"{where}: the neck reads {in_channels} channels, but no increasing choice of "
                               f"{backbone} width {width:g} stages gives them (stage channels "
                               f"{dict(per_stage)})")
        preferred = [s for s in later if s in default]
        chosen.append(preferred[0] if preferred else later[-1])
        ambiguous |= len(later) > 1
    if ambiguous:
        assumed.append(f"out_stages {tuple(chosen)} (other {backbone} stages have the same channels; NanoDet's "
                       f"default taps chosen)")
    return tuple(chosen)


def _infer_neck(tensors: dict, where: str, assumed: list) -> tuple[dict, list[int]]:
    keys = list(tensors)
    if "fpn.reduce_layers.0.conv.weight" in tensors:
        levels = _indices(keys, "fpn.reduce_layers.")
        in_channels = [_need(tensors, f"fpn.reduce_layers.{i}.conv.weight", where, "the neck")[1] for i in levels]
        c = _need(tensors, "fpn.reduce_layers.0.conv.weight", where, "the neck")[0]
        fields = {"neck": "ghost_pan", "neck_channels": c,
                  "num_extra_level": len(_indices(keys, "fpn.extra_lvl_in_conv."))}
        conv = next((f"{m}.0.{kind}.weight" for m in ("fpn.downsamples", "fpn.extra_lvl_in_conv")
                     for kind in ("depthwise", "conv") if f"{m}.0.{kind}.weight" in tensors), None)
        if conv is not None:
            fields["use_depthwise"] = ".depthwise." in conv
            fields["neck_kernel_size"] = _need(tensors, conv, where, "the neck")[-1]
        else:  # one input level and no extra level: nothing downsamples
            shortcut = "fpn.top_down_blocks.0.blocks.0.shortcut.0.weight"
            if shortcut in tensors:
                fields["neck_kernel_size"] = _need(tensors, shortcut, where, "the neck")[-1]
        blocks = "fpn.top_down_blocks.0."
        if any(k.startswith(blocks) for k in keys):
            fields["num_blocks"] = len(_indices(keys, blocks + "blocks."))
            fields["use_res"] = f"{blocks}reduce_conv.conv.weight" in tensors
            mid = _need(tensors, f"{blocks}blocks.0.ghost2.primary_conv.0.weight", where, "GhostPAN's expand")[1]
            fields["expand"] = mid // c if mid % c == 0 else mid / c
        act, why = ASSUMED_ACTIVATIONS["ghost_pan"]
    elif "fpn.lateral_convs.0.conv.weight" in tensors:
        levels = _indices(keys, "fpn.lateral_convs.")
        in_channels = [_need(tensors, f"fpn.lateral_convs.{i}.conv.weight", where, "the neck")[1] for i in levels]
        c = _need(tensors, "fpn.lateral_convs.0.conv.weight", where, "the neck")[0]
        if "fpn.lateral_convs.0.conv.bias" not in tensors:
            raise WeightsError(f"{where}: PAN's lateral convs have no bias (a norm_cfg), not supported: refghost "
                               f"builds NanoDet's PAN as its configs have it (norm_cfg None)")
        fields = {"neck": "pan", "neck_channels": c, "num_extra_level": 0}
        act, why = ASSUMED_ACTIVATIONS["pan"]
    else:
        first = next((k for k in keys if k.startswith("fpn.")), None)
        if first is None:
            raise WeightsError(f"{where}: no neck (fpn.*) keys: a backbone alone? Convert it with --arch nanodet")
        raise WeightsError(f"{where}: cannot tell the neck (first key {first!r}): neither GhostPAN "
                           f"(fpn.reduce_layers.*) nor PAN (fpn.lateral_convs.*); refghost builds GhostPAN and PAN")
    fields["neck_activation"] = act
    assumed.append(f"neck_activation {act} ({why})")
    return fields, in_channels


def _infer_head(tensors: dict, where: str, assumed: list) -> tuple[dict, int]:
    keys = list(tensors)
    if "head.gfl_cls.0.weight" not in tensors:
        first = next((k for k in keys if k.startswith("head.")), None)
        if first is None:
            raise WeightsError(f"{where}: no head (head.*) keys: a backbone alone? Convert it with --arch nanodet")
        raise WeightsError(f"{where}: cannot tell the head (first key {first!r}): no head.gfl_cls.0.weight; refghost "
                           f"builds NanoDetPlusHead and NanoDetHead")
    legacy = any(k.startswith("head.gfl_reg.") for k in keys)
    stacked = len(_indices(keys, "head.cls_convs.0."))
    out, feat = _need(tensors, "head.gfl_cls.0.weight", where, "the head")[:2]
    fields = {"head": "nanodet" if legacy else "nanodet_plus", "stacked_convs": stacked, "head_feat_channels": feat}
    if stacked:
        dw = "head.cls_convs.0.0.depthwise.weight"
        conv = dw if dw in tensors else "head.cls_convs.0.0.conv.weight"
        fields["head_conv_type"] = "DWConv" if conv == dw else "Conv"
        fields["head_kernel_size"] = _need(tensors, conv, where, "the head's kernel")[-1]
    elif not legacy:
        fields["head_kernel_size"] = 5
    if legacy:
        fields["head_kernel_size"] = 3
        bins = _need(tensors, "head.gfl_reg.0.weight", where, "the head's reg_max")[0]
        if bins % 4 or bins < 4:
            raise WeightsError(f"{where}: head.gfl_reg.0.weight has {bins} outputs, not 4 x (reg_max + 1)")
        share = not any(k.startswith("head.reg_convs.") for k in keys)
        if not stacked:
            assumed.append("share_cls_reg True (with stacked_convs 0 both layouts have the same keys)")
        fields.update(share_cls_reg=share, reg_max=bins // 4 - 1, num_classes=out - bins if share else out)
    elif PROJECT_KEY in tensors:  # the Integral's bins 0..reg_max: reg_max is exact
        bins = _need(tensors, PROJECT_KEY, where, "reg_max", ndim=1)
        reg_max = bins[0] - 1
        if reg_max < 0 or out - 4 * (reg_max + 1) < 1:
            raise WeightsError(f"{where}: {PROJECT_KEY} has shape {list(bins)} but head.gfl_cls.0.weight has {out} "
                               f"outputs: not num_classes + 4 x (reg_max + 1)")
        fields.update(share_cls_reg=True, reg_max=reg_max, num_classes=out - 4 * (reg_max + 1))
    else:
        splits = [(r, out - 4 * (r + 1)) for r in range(out // 4) if out - 4 * (r + 1) >= 1]
        if not splits:
            raise WeightsError(f"{where}: head.gfl_cls.0.weight has {out} outputs, too few for num_classes + "
                               f"4 x (reg_max + 1)")
        chosen = dict(splits).get(DEFAULT_REG_MAX)
        if chosen is not None:
            reg_max, num_classes = DEFAULT_REG_MAX, chosen
        elif len(splits) == 1:
            reg_max, num_classes = splits[0]
        else:
            raise WeightsError(f"{where}: head.gfl_cls.0.weight has {out} outputs = num_classes + 4 x (reg_max + 1), "
                               f"which splits {len(splits)} ways and not with reg_max {DEFAULT_REG_MAX}; pass the "
                               f"NanoDet config (--config) that says num_classes and reg_max")
        if len(splits) > 1:
            assumed.append(f"reg_max {reg_max}, so num_classes {num_classes} (the head's {out} outputs are "
                           f"num_classes + 4 x (reg_max + 1); reg_max {DEFAULT_REG_MAX} is every NanoDet-Plus "
                           f"config's)")
        fields.update(share_cls_reg=True, reg_max=reg_max, num_classes=num_classes)
    act, why = ASSUMED_ACTIVATIONS["head"]
    fields["head_activation"] = act
    assumed.append(f"head_activation {act} ({why})")
    return fields, len(_indices(keys, "head.gfl_cls."))


def infer_detector_config(tensors: dict, where: str = "<state_dict>") -> tuple[DetectorConfig, tuple[str, ...]]:
    """``(config, assumed)``: the DetectorConfig that NanoDet ``backbone.``/``fpn.``/``head.`` tensors
    (prefixes stripped, as :func:`select_detector_tensors` gives) describe, and what was assumed.

    Read from the shapes: the backbone (``conv_stem``: GhostNet, its width from all its conv
    shapes; ``conv1``: ShuffleNetV2, its ``model_size`` from the stage channels); ``out_stages``
    (the stages whose channels the neck reads); the neck (``reduce_layers``: GhostPAN, with its
    channels, kernel, extra levels, depthwise downsampling, blocks, expand, residual;
    ``lateral_convs``: PAN); the head (``gfl_reg`` present: NanoDetHead, else NanoDetPlusHead;
    stacked convs, conv type, kernel, feature channels, ``share_cls_reg``); ``reg_max`` (the
    legacy head's ``gfl_reg``, or the length of the Integral's bins buffer
    ``head.distribution_project.project``) and so ``num_classes``; the strides (the levels' own).
    Assumed, and listed: the activations; ``out_stages`` where stages share channel counts
    (GhostNet's 3 and 4: NanoDet's default taps); NanoDet-Plus's ``reg_max`` 7 when the bins
    buffer is absent and the head's outputs split several ways. Raises WeightsError naming what
    is missing or unrecognised.
    """
    assumed: list[str] = []
    backbone, width = _infer_backbone(tensors, where)
    act, why = ASSUMED_ACTIVATIONS[backbone]
    assumed.append(f"backbone_activation {act} ({why})")
    neck, in_channels = _infer_neck(tensors, where, assumed)
    out_stages = _infer_out_stages(backbone, width, in_channels, where, assumed)
    head, levels = _infer_head(tensors, where, assumed)
    strides = level_strides(_Taps(backbone, width, out_stages, neck["num_extra_level"]))
    if levels != len(strides):
        raise WeightsError(f"{where}: the head has {levels} levels (head.gfl_cls.*) but the neck outputs "
                           f"{len(strides)} ({len(out_stages)} backbone levels + {neck['num_extra_level']} extra)")
    try:
        config = DetectorConfig(backbone=backbone, backbone_width=width, backbone_activation=act,
                                out_stages=out_stages, strides=strides, **neck, **head)
    except RefghostError as exc:  # the config's own checks
        raise WeightsError(f"{where}: the shapes describe no valid detector: {exc}") from None
    return config, tuple(assumed)


def preset_name(config: DetectorConfig) -> str | None:
    """The first :data:`~refghost.detector.spec.PRESETS` name equal to ``config``, if any."""
    return next((name for name, preset in PRESETS.items() if preset == config), None)


# --------------------------------------------------------------------------------------------
# Checking against the graph
# --------------------------------------------------------------------------------------------
#: Why NanoDet's state_dict holds keys its inference never reads (see ``unread_state_dict_keys``).
UNREAD_REASONS = {
    "head.gfl_reg.": "NanoDetHead builds gfl_reg even with share_cls_reg, and never reads it",
    "head.distribution_project.": "the Integral's fixed bins 0..reg_max (a buffer), read only by box decoding",
}


def _check(tensors: dict, config: DetectorConfig, where: str):
    """``(kept, dropped)``: the graph's tensors of ``tensors``, in graph order, shapes checked;
    the keys NanoDet holds but never reads for inference are shape-checked too, and dropped."""
    expected = build_detector_graph(config).param_shapes
    unread = unread_state_dict_keys(config)
    what = preset_name(config) or "the detector config"
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise WeightsError(f"{where}: missing {len(missing)} key(s) that {what} needs, first {missing[0]!r} with "
                           f"shape {list(expected[missing[0]])}" + _hint(tensors, missing[0]))
    for key, shape in list(expected.items()) + [(k, s) for k, s in unread.items() if k in tensors]:
        found = tuple(np.shape(tensors[key]))
        if found != shape:
            note = (f" (reg_max {found[0] - 1}, the config says {config.reg_max})"
                    if key.startswith("head.distribution_project.") and len(found) == 1 else "")
            raise WeightsError(f"{where}: key {key!r} has shape {list(found)}, {what} needs {list(shape)}{note}")
    if PROJECT_KEY in tensors and not np.array_equal(tensors[PROJECT_KEY], np.arange(config.reg_max + 1)):
        raise WeightsError(f"{where}: key {PROJECT_KEY!r} is {np.asarray(tensors[PROJECT_KEY]).tolist()}, not the "
                           f"bins 0..{config.reg_max} NanoDet's Integral holds; NanoDet would decode boxes with "
                           f"these values, refghost with the bins")
    extra = [k for k in tensors if k not in expected and k not in unread]
    if extra:
        raise WeightsError(f"{where}: {len(extra)} key(s) that {what} does not have, first {extra[0]!r} with shape "
                           f"{list(np.shape(tensors[extra[0]]))}: the checkpoint is another network than the config "
                           f"says (compare stacked_convs, num_blocks, use_res, activations such as PReLU)")
    dropped = []
    for prefix, reason in UNREAD_REASONS.items():
        dropped += _dropped([k for k in tensors if k in unread and k.startswith(prefix)], reason, depth=2)
    return {k: tensors[k] for k in expected}, tuple(dropped)


def _hint(tensors: dict, missing: str) -> str:
    """Why a key the graph needs may be missing: the part is absent, or another one than configured."""
    part = _group(missing)
    if any(k.startswith(part + ".") for k in tensors):
        return f"; the checkpoint's {part}.* keys describe another {part} than the config does"
    if part in ("fpn", "head"):
        return f"; the checkpoint has no {part}.* keys (a backbone alone? convert it with --arch nanodet)"
    return f"; the checkpoint has no {part}.* keys"


def detector_from_state_dict(state_dict: dict, config: DetectorConfig | None = None,
                             where: str = "<state_dict>") -> DetectorCheckpoint:
    """The whole detector of a NanoDet state_dict (a ``load_state_dict`` result; see the module docstring).

    With ``config`` None the architecture is inferred (:func:`infer_detector_config`). Raises
    WeightsError naming the first missing key, the first mis-shaped key or the first key the
    config does not explain.
    """
    tensors, origin, dropped = select_detector_tensors(state_dict, where)
    assumed: tuple[str, ...] = ()
    if config is None:
        config, assumed = infer_detector_config(tensors, where)
    elif not isinstance(config, DetectorConfig):
        raise WeightsError(f"{where}: config must be a DetectorConfig, got {type(config).__name__}")
    kept, unused = _check(tensors, config, where)
    return DetectorCheckpoint(config, kept, origin, dropped + unused, assumed)


def read_detector_checkpoint(path, config: DetectorConfig | None = None) -> DetectorCheckpoint:
    """:func:`detector_from_state_dict` of checkpoint file ``path`` (``.ckpt``/``.pth``/``.pt``, read
    without PyTorch by :func:`refghost.convert.checkpoint.load_state_dict`, or an ``.npz``)."""
    path = os.fspath(path)
    return detector_from_state_dict(read_state_dict(path), config, where=path)
