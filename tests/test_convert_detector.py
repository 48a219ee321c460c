"""Whole-detector conversion: NanoDet's YAML config (refghost.convert.nanodet_config) and NanoDet
checkpoints as detectors (refghost.convert.detector): EMA copy, training-only keys, inference of
the architecture from shapes, and the refusals."""

import collections
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_nanodet as tn

from refghost.convert.detector import (detector_from_state_dict, infer_detector_config, preset_name,
                                       read_detector_checkpoint)
from refghost.convert.nanodet_config import MAX_CONFIG_BYTES, MAX_DEPTH, read_nanodet_config
from refghost.convert.state_dict import split_backbone, weights_from_state_dict
from refghost.detector.classes import COCO_CLASSES
from refghost.detector.graph import build_detector_graph, unread_state_dict_keys
from refghost.detector.spec import PRESETS, DetectorConfig
from refghost.errors import RefghostError, WeightsError

CONFIGS = Path(__file__).parent / "data" / "nanodet_configs"
PLUS_YML, LEGACY_YML = CONFIGS / "nanodet-plus-m_320.yml", CONFIGS / "nanodet-m.yml"
PLUS = PRESETS["nanodet-plus-m_320"]
#: A small GhostNet composition that is no preset (width 0.5, 3 classes, one stacked conv).
SMALL_GHOST = DetectorConfig(backbone="ghostnet", backbone_width=0.5, backbone_activation="ReLU", neck_channels=32,
                             head_feat_channels=32, num_classes=3, stacked_convs=1)
NANODET_MEAN, NANODET_STD = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def numpy_state_dict(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_state_dict(config: DetectorConfig, seed: int = 0) -> dict:
    """Random float32 tensors with the keys and shapes NanoDet's state_dict has for ``config``
    (the graph's, plus the unread ones; the Integral's bins buffer holds its real values)."""
    rng = np.random.default_rng(seed)
    shapes = {**build_detector_graph(config).param_shapes, **unread_state_dict_keys(config)}
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    sd["head.distribution_project.project"] = np.arange(config.reg_max + 1, dtype=np.float32)
    return sd


def aux_tensors(sd: dict) -> dict:
    """NanoDet-Plus's training-only modules: aux_fpn (a deep copy of the neck) and a few
    SimpleConvHead tensors (192 channels: the two necks' outputs concatenated)."""
    aux = {"aux_fpn." + k[len("fpn."):]: np.asarray(v + 1) for k, v in sd.items() if k.startswith("fpn.")}
    aux["aux_head.cls_convs.0.conv.weight"] = np.ones((192, 192, 3, 3), np.float32)
    aux["aux_head.cls_convs.0.gn.weight"] = np.ones(192, np.float32)
    aux["aux_head.gfl_cls.weight"] = np.ones((112, 192, 3, 3), np.float32)
    return aux


def save_lightning(path, raw: dict | None, ema: dict | None):
    """A checkpoint as NanoDet's Lightning TrainingTask saves it: ``state_dict`` with ``model.``
    and (EMA) ``avg_model.`` keys, training-only aux modules in both, optimizer/scheduler state."""
    state = collections.OrderedDict()
    for prefix, sd in (("model.", raw), ("avg_model.", ema)):
        if sd is not None:
            for key, value in {**sd, **aux_tensors(sd)}.items():
                state[prefix + key] = torch.from_numpy(value)
    torch.save({"epoch": 9, "global_step": 1000, "pytorch-lightning_version": "1.9.5", "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001}]}],
                "lr_schedulers": [{"milestones": collections.Counter({240: 1, 260: 1})}],
                "hyper_parameters": {"cfg": {"save_dir": "workspace/nanodet-plus-m_320"}}}, path)
    return path


def not_counter(keys):
    return [k for k in keys if not k.endswith("num_batches_tracked")]


@pytest.fixture(scope="module")
def plus_copies():
    """NanoDet-Plus-m state_dicts from the independent PyTorch NanoDet: the raw and the EMA copy
    (different values, as after training)."""
    model = tn.build(PLUS)
    raw = numpy_state_dict(tn.randomize(model, seed=1))
    ema = numpy_state_dict(tn.randomize(model, seed=2))
    return raw, ema


def variant(tmp_path, source: Path, *edits) -> Path:
    """``source``'s text with each (old, new) replaced once (old must occur), as a new file."""
    text = source.read_text()
    for old, new in edits:
        assert text.count(old) >= 1, old
        text = text.replace(old, new, 1)
    path = tmp_path / f"edited_{source.name}"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# NanoDet's YAML config
# --------------------------------------------------------------------------------------------
def test_plus_config_reads_as_the_preset():
    s = read_nanodet_config(PLUS_YML)
    assert s.detector == PLUS and preset_name(s.detector) == "nanodet-plus-m_320"
    assert s.input_size == (320, 320) and s.keep_ratio is False
    assert s.mean == NANODET_MEAN and s.std == NANODET_STD
    assert s.class_names == COCO_CLASSES and s.source == str(PLUS_YML)


def test_legacy_config_reads_as_the_preset():
    s = read_nanodet_config(LEGACY_YML)
    assert s.detector == PRESETS["nanodet-m"] and s.detector.strides == (8, 16, 32)
    assert s.input_size == (320, 320) and s.keep_ratio is True and len(s.class_names) == 80


def test_config_options_map_with_nanodets_defaults(tmp_path):
    shufflenet = "name: ShuffleNetV2\n      model_size: 1.0x\n      out_stages: [2,3,4]\n      activation: LeakyReLU"
    ghostnet = "name: GhostNet\n      width_mult: 1.0\n      activation: ReLU"  # out_stages: NanoDet's default
    ghost = variant(tmp_path, PLUS_YML, (shufflenet, ghostnet),
                    ("in_channels: [116, 232, 464]", "in_channels: [40, 112, 960]"))
    assert read_nanodet_config(ghost).detector == PRESETS["ghostnet-ghostpan-plus"]
    # an option left out takes NanoDet's default, not refghost's preset value
    no_dw = variant(tmp_path, PLUS_YML, ("      use_depthwise: True\n", ""))
    assert read_nanodet_config(no_dw).detector.use_depthwise is False
    three = variant(tmp_path, PLUS_YML,
                    ("num_classes: 80\n      input_channel: 96", "num_classes: 3\n      input_channel: 96"),
                    ("class_names: [", "class_names: ['a', 'b', 3]\nunused: ["))
    s = read_nanodet_config(three)
    assert s.detector.num_classes == 3 and s.class_names == ("a", "b", "3")


REFUSALS = [
    ("name: ShuffleNetV2", "name: EfficientNetLite",
     ("model.arch.backbone.name", "EfficientNetLite", "ShuffleNetV2 and GhostNet backbones")),
    ("name: GhostPAN", "name: TAN", ("model.arch.fpn.name", "TAN")),
    ("in_channels: [116, 232, 464]", "in_channels: [116, 232, 460]",
     ("model.arch.fpn.in_channels", "[116, 232, 460]", "[116, 232, 464]")),
    ("input_channel: 96\n      feat_channels: 96\n      stacked_convs: 2\n      kernel_size: 5",
     "input_channel: 64\n      feat_channels: 96\n      stacked_convs: 2\n      kernel_size: 5",
     ("model.arch.head.input_channel", "64", "96")),
    ("strides: [8, 16, 32, 64]\n      activation: LeakyReLU\n      reg_max", "strides: [8, 16, 32]\n      "
     "activation: LeakyReLU\n      reg_max", ("model.arch.head.strides", "(8, 16, 32, 64)")),
    ("      activation: LeakyReLU\n    fpn:", "      activation: LeakyReLU\n      with_last_conv: True\n    fpn:",
     ("model.arch.backbone.with_last_conv",)),
    ("      num_extra_level: 1\n", "      num_extra_level: 1\n      depth: 3\n",
     ("model.arch.fpn.depth", "not an option of NanoDet's GhostPAN")),
    ("      num_extra_level: 1\n", "      num_extra_level: 1\n      upsample_cfg: {scale_factor: 2, mode: nearest}\n",
     ("model.arch.fpn.upsample_cfg", "nearest")),
    ("norm_cfg:\n        type: BN", "norm_cfg:\n        type: GN", ("model.arch.head.norm_cfg.type", "'GN'")),
    ("activation: LeakyReLU\n      reg_max: 7\n      norm_cfg", "activation: Mish\n      reg_max: 7\n      norm_cfg",
     ("model.arch.head.activation", "Mish")),
    ("model_size: 1.0x", "model_size: 3.0x", ("model.arch.backbone.model_size", "3.0x")),
    ("instances_val2017.json\n    input_size: [320,320]", "instances_val2017.json\n    input_size: [320]",
     ("data.val.input_size",)),
    ("instances_val2017.json\n    input_size: [320,320]", "instances_val2017.json\n    input_size: [320,300]",
     ("data.val.input_size", "[320, 300]", "multiple of 32")),
    ("  val:\n    name: CocoDataset", "  test:\n    name: CocoDataset", ("data.val", "missing")),
    ("class_names: ['person'", "class_names: [yes", ("class_names[0]", "boolean", "quote")),
    ("class_names: ['person', ", "class_names: [", ("class_names", "79 names", "80 classes")),
]


@pytest.mark.parametrize("old, new, expected", REFUSALS, ids=[r[2][0] for r in REFUSALS])
def test_config_refusals_name_the_key(tmp_path, old, new, expected):
    path = variant(tmp_path, PLUS_YML, (old, new))
    with pytest.raises(RefghostError) as err:
        read_nanodet_config(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, message


def test_not_a_yaml_config(tmp_path):
    ckpt = tmp_path / "model_best.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    with pytest.raises(RefghostError, match="not a YAML config"):
        read_nanodet_config(ckpt)
    broken = tmp_path / "broken.yml"
    broken.write_text("model:\n  arch: [1, 2\n")
    with pytest.raises(RefghostError, match=r"not a valid YAML config \(line"):
        read_nanodet_config(broken)
    scalar = tmp_path / "scalar.yml"
    scalar.write_text("just some text\n")
    with pytest.raises(RefghostError, match="the top level is a string"):
        read_nanodet_config(scalar)
    with pytest.raises(RefghostError, match="cannot read the config"):
        read_nanodet_config(tmp_path / "absent.yml")


def test_huge_or_deep_config_is_refused_before_parsing(tmp_path):
    huge = tmp_path / "huge.yml"
    with open(huge, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(RefghostError, match=f"{MAX_CONFIG_BYTES + 1} bytes.*more than {MAX_CONFIG_BYTES}"):
        read_nanodet_config(huge)
    deep = tmp_path / "deep.yml"
    deep.write_text("model: " + "[" * 10_000 + "]" * 10_000 + "\n")  # would exhaust the recursive constructor
    with pytest.raises(RefghostError, match=f"nested more than {MAX_DEPTH} levels"):
        read_nanodet_config(deep)


def test_missing_pyyaml_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    with pytest.raises(RefghostError, match=r'refghost\[config\]'):
        read_nanodet_config(PLUS_YML)


# --------------------------------------------------------------------------------------------
# Checkpoints as detectors
# --------------------------------------------------------------------------------------------
def test_lightning_checkpoint_uses_the_ema_copy_and_reports_drops(tmp_path, plus_copies):
    raw, ema = plus_copies
    path = save_lightning(tmp_path / "model_best.ckpt", raw, ema)
    ckpt = read_detector_checkpoint(path)
    graph_keys = list(build_detector_graph(PLUS).param_shapes)
    assert ckpt.config == PLUS and list(ckpt.tensors) == graph_keys
    assert ckpt.origin == "avg_model (EMA)"
    for key in graph_keys:
        np.testing.assert_array_equal(ckpt.tensors[key], ema[key])
    assert not np.array_equal(raw["head.gfl_cls.0.weight"], ema["head.gfl_cls.0.weight"])
    dropped = {g.group: g.count for g in ckpt.dropped}
    n_fpn = len(not_counter(k for k in raw if k.startswith("fpn.")))
    assert dropped == {"model": len(not_counter(raw)) + n_fpn + 3, "aux_fpn": n_fpn, "aux_head": 3,
                       "head.distribution_project": 1}
    assert "EMA" in str(next(g for g in ckpt.dropped if g.group == "model"))
    assert [a.split()[0] for a in ckpt.assumed] == ["backbone_activation", "neck_activation", "head_activation"]
    # with NanoDet's config nothing is assumed, and the same tensors are kept
    given = read_detector_checkpoint(path, read_nanodet_config(PLUS_YML).detector)
    assert given.assumed == () and given.config == PLUS
    assert all(np.array_equal(given.tensors[k], ckpt.tensors[k]) for k in graph_keys)


def test_raw_and_bare_checkpoints(tmp_path, plus_copies):
    raw, _ = plus_copies
    model_only = read_detector_checkpoint(save_lightning(tmp_path / "no_ema.ckpt", raw, None))
    assert model_only.origin == "model" and "model" not in {g.group for g in model_only.dropped}
    assert {g.group for g in model_only.dropped} == {"aux_fpn", "aux_head", "head.distribution_project"}
    # nanodet_model_best.pth: {"state_dict": bare keys}; and a DataParallel "module." export
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in raw.items()}}, tmp_path / "best.pth")
    torch.save({"module." + k: torch.from_numpy(v) for k, v in raw.items()}, tmp_path / "dp.pth")
    for name in ("best.pth", "dp.pth"):
        ckpt = read_detector_checkpoint(tmp_path / name)
        assert ckpt.origin == "bare state_dict" and ckpt.config == PLUS
        for key, value in ckpt.tensors.items():
            np.testing.assert_array_equal(value, raw[key])


@pytest.mark.parametrize("config", [PRESETS["nanodet-m"], SMALL_GHOST], ids=["nanodet-m", "small-ghostnet"])
def test_architecture_inferred_from_torch_state_dicts(config):
    sd = numpy_state_dict(tn.randomize(tn.build(config), seed=3))
    ckpt = detector_from_state_dict(sd)
    assert ckpt.config == config
    groups = {g.group: g.count for g in ckpt.dropped}
    if config.head == "nanodet":  # built for every level, never read with share_cls_reg
        assert groups["head.gfl_reg"] == 2 * len(config.strides)
    if config.backbone == "ghostnet":  # GhostNet's stages 3 and 4 both have 20 channels at 0.5x
        assert any(a.startswith("out_stages (4, 6, 9)") for a in ckpt.assumed)


def test_reg_max_from_the_bins_buffer_or_assumed():
    custom = DetectorConfig(num_classes=10, reg_max=5)
    assert infer_detector_config({k: v for k, v in random_state_dict(custom).items()})[0] == custom
    sd = random_state_dict(PLUS)
    del sd["head.distribution_project.project"]
    config, assumed = infer_detector_config(sd)
    assert config == PLUS and any(a.startswith("reg_max 7, so num_classes 80") for a in assumed)
    # a config whose split gives the same channel count (84 + 4*7 == 80 + 4*8) is caught by the buffer
    wrong = DetectorConfig(num_classes=84, reg_max=6)
    with pytest.raises(WeightsError, match=r"distribution_project.project.*\[8\].*\[7\].*reg_max 7, the config says 6"):
        detector_from_state_dict(random_state_dict(PLUS), wrong)


def test_split_backbone_names_what_it_left(tmp_path):
    sd = numpy_state_dict(tn.randomize(tn.build(SMALL_GHOST), seed=4))
    path = save_lightning(tmp_path / "ghost.ckpt", sd, sd)
    from refghost.convert.checkpoint import load_state_dict
    backbone, left = split_backbone(load_state_dict(path), "nanodet")
    count = collections.Counter(k.split(".")[0] for k in not_counter(sd))
    assert left == {"fpn": count["fpn"], "head": count["head"], "aux_fpn": count["fpn"], "aux_head": 3}
    assert set(backbone) == {k[len("backbone."):] for k in sd if k.startswith("backbone.")}
    weights = weights_from_state_dict(path, arch="nanodet", width=0.5, activation="ReLU", out_stages=(4, 6, 9))
    np.testing.assert_array_equal(weights.tensors["conv_stem.weight"], sd["backbone.conv_stem.weight"])
    only = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    assert split_backbone(only, "nanodet")[1] == {}


def _error(sd, config=None):
    with pytest.raises(WeightsError) as err:
        detector_from_state_dict(sd, config, where="ckpt.pth")
    assert str(err.value).startswith("ckpt.pth: ")
    return str(err.value)


def test_checkpoint_errors_name_the_key():
    sd = random_state_dict(PLUS)
    missing = {k: v for k, v in sd.items() if k != "head.gfl_cls.2.weight"}
    message = _error(missing, PLUS)
    assert "missing 1 key" in message and "'head.gfl_cls.2.weight' with shape [112, 96, 1, 1]" in message
    wrong = {**sd, "fpn.reduce_layers.1.conv.weight": np.zeros((96, 200, 1, 1), np.float32)}
    assert "'fpn.reduce_layers.1.conv.weight' has shape [96, 200, 1, 1]" in _error(wrong, PLUS)
    assert "[96, 232, 1, 1]" in _error(wrong, PLUS)
    extra = {**sd, "head.cls_convs.0.2.depthwise.weight": np.zeros((96, 1, 5, 5), np.float32)}
    assert "'head.cls_convs.0.2.depthwise.weight'" in _error(extra, PLUS)
    efficientnet = {("backbone.stem.0.weight" if k == "backbone.conv1.0.weight" else k): v for k, v in sd.items()}
    message = _error(efficientnet)
    assert "cannot tell the backbone" in message and "ShuffleNetV2 and GhostNet backbones" in message
    backbone_only = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    assert "a backbone alone" in _error(backbone_only) and "--arch nanodet" in _error(backbone_only, PLUS)
    foreign = {**sd, "loss.weight": np.zeros(3, np.float32)}
    assert "'loss.weight' is not part of a NanoDet detector" in _error(foreign)
    no_neck = {k: v for k, v in sd.items() if not k.startswith("fpn.reduce_layers.")}
    assert "cannot tell the neck" in _error(no_neck)
    bins = {**sd, "head.distribution_project.project": np.arange(8, dtype=np.float32) * 2}
    assert "not the bins 0..7" in _error(bins, PLUS)
