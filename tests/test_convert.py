"""Converting PyTorch checkpoints (plain, NanoDet, Huawei/timm) into weights files."""

import numpy as np
import pytest
import torch
import torch_ghostnet as tg

import refghost
from refghost.convert import convert
from refghost.convert.state_dict import select_backbone
from refghost.errors import WeightsError


@pytest.fixture(scope="module")
def backbone():
    """A randomised NanoDet GhostNet 0.5x (LeakyReLU) and its state_dict."""
    model = tg.randomize(tg.build("nanodet", 0.5, "LeakyReLU"), seed=1)
    return model, model.state_dict()


def _check_same(weights, state_dict):
    for key, value in weights.tensors.items():
        np.testing.assert_array_equal(value, state_dict[key].numpy())


def test_plain_state_dict(tmp_path, backbone):
    model, sd = backbone
    torch.save(sd, tmp_path / "sd.pth")
    w = convert(tmp_path / "sd.pth", tmp_path / "w.h5", width=0.5, activation="LeakyReLU")
    loaded = refghost.load_weights(tmp_path / "w.h5")
    _check_same(loaded, sd)
    assert loaded.config == w.config and loaded.provenance["source_file"] == "sd.pth"
    assert len(loaded.provenance["source_sha256"]) == 64
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    out = refghost.run(x, loaded, dtype="float64")
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x.astype(np.float64)))
    model.float()
    for name, t in zip(out, expected):
        np.testing.assert_allclose(out[name], t.numpy(), rtol=0, atol=1e-10 * np.abs(t.numpy()).max())


def test_nanodet_lightning_checkpoint_prefers_ema(tmp_path, backbone):
    _, sd = backbone
    ema = {k: v + 1 if v.is_floating_point() and not k.endswith("running_var") else v for k, v in sd.items()}
    state = {f"model.backbone.{k}": v for k, v in sd.items()}
    state.update({f"avg_model.backbone.{k}": v for k, v in ema.items()})
    state["model.head.gfl_cls.0.weight"] = torch.zeros(3)
    state["avg_model.fpn.reduce_layers.0.weight"] = torch.zeros(3)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "model.ckpt")
    w = convert(tmp_path / "model.ckpt", tmp_path / "w.h5", width=0.5, activation="LeakyReLU")
    _check_same(w, ema)


def test_module_prefix_and_npz(tmp_path, backbone):
    _, sd = backbone
    np.savez(tmp_path / "sd.npz", **{f"module.backbone.{k}": v.numpy() for k, v in sd.items()})
    w = convert(tmp_path / "sd.npz", tmp_path / "w.h5", width=0.5, activation="LeakyReLU")
    _check_same(w, sd)


def test_huawei_classifier_as_backbone_and_as_classifier(tmp_path):
    model = tg.randomize(tg.build("ghostnet", 1.0, num_classes=7), seed=2)
    torch.save(model.state_dict(), tmp_path / "huawei.pth")
    backbone = convert(tmp_path / "huawei.pth", tmp_path / "b.h5", arch="nanodet")
    assert "conv_head.weight" not in backbone.tensors and len(backbone.tensors) == 428
    classifier = convert(tmp_path / "huawei.pth", tmp_path / "c.h5", arch="ghostnet")
    assert classifier.config.num_classes == 7
    assert classifier.preprocessing.channel_order == "RGB"
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    logits = refghost.run(x, tmp_path / "c.h5", dtype="float64")["classifier"]
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_wrong_width_names_the_key(tmp_path, backbone):
    _, sd = backbone
    torch.save(sd, tmp_path / "sd.pth")
    with pytest.raises(WeightsError, match=r"sd\.pth: key 'conv_stem\.weight' has shape \[8, 3, 3, 3\], "
                                           r"expected \[16, 3, 3, 3\]"):
        convert(tmp_path / "sd.pth", tmp_path / "w.h5", width=1.0, activation="LeakyReLU")
    assert not (tmp_path / "w.h5").exists()


def test_prelu_needs_its_keys(tmp_path, backbone):
    _, sd = backbone
    torch.save(sd, tmp_path / "sd.pth")
    with pytest.raises(WeightsError, match=r"missing 34 key"):
        convert(tmp_path / "sd.pth", tmp_path / "w.h5", width=0.5, activation="PReLU")


def test_classifier_arch_needs_head(tmp_path, backbone):
    _, sd = backbone
    torch.save(sd, tmp_path / "sd.pth")
    with pytest.raises(WeightsError, match="classifier.weight"):
        convert(tmp_path / "sd.pth", tmp_path / "w.h5", arch="ghostnet", width=0.5)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "not a PyTorch checkpoint"),
    (None, "no such checkpoint"),
])
def test_unreadable_checkpoint(tmp_path, content, message):
    src = tmp_path / "bad.pth"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        convert(src, tmp_path / "w.h5")
    assert not (tmp_path / "w.h5").exists()


def test_half_precision_is_refused(tmp_path, backbone):
    _, sd = backbone
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "h.pth")
    with pytest.raises(WeightsError, match="torch.float16"):
        convert(tmp_path / "h.pth", tmp_path / "w.h5", width=0.5, activation="LeakyReLU")


def test_unsafe_pickle_is_refused(tmp_path):
    """weights_only loading: a pickle that would call a function is refused, nothing runs."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", pickle_module=pickle)
    with pytest.raises(WeightsError, match="refuses global io.open"):
        convert(tmp_path / "evil.pth", tmp_path / "w.h5")
    assert not marker.exists()


def test_select_backbone_strips_prefixes():
    sd = {"module.model.backbone.conv_stem.weight": 1, "module.model.head.x": 2}
    assert select_backbone(sd, "nanodet") == {"conv_stem.weight": 1}


def test_same_bytes_with_and_without_torch(tmp_path, backbone):
    """The converter reads checkpoints without torch: with torch blocked from importing, the same
    checkpoint gives a byte-identical weights file."""
    import subprocess
    import sys

    _, sd = backbone
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}}, tmp_path / "m.ckpt")
    convert(tmp_path / "m.ckpt", tmp_path / "with.h5", width=0.5, activation="LeakyReLU")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from refghost.convert import convert\n"
            f"convert({str(tmp_path / 'm.ckpt')!r}, {str(tmp_path / 'without.h5')!r}, width=0.5, "
            "activation='LeakyReLU')")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "with.h5").read_bytes() == (tmp_path / "without.h5").read_bytes()
