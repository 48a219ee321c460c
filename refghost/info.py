"""What a refghost file holds: :func:`describe`, behind ``refghost info``.

A weights file (``docs/weights-format.md``) or a golden file (``docs/golden-format.md``) is read
in full through its own validating reader, then summarised as a dict (``refghost info --json``
prints it as is; ``refghost info`` as lines).
"""

from __future__ import annotations

from .errors import RefghostError


def describe(path: str) -> dict:
    """What the weights or golden file at ``path`` holds, validated (raises
    :class:`~refghost.errors.RefghostError` if it is unusable): ``kind`` (``"weights"`` or
    ``"golden"``), the network's ``config``, its ``preprocessing``, ``provenance``, the counts of
    ``tensors``, trainable ``parameters`` and stored ``values``; a weights file's ``sha256``; a
    golden's ``input_shape``, ``outputs``, number of ``intermediates`` and root ``attributes`` (and
    a detector golden's number of ``detections``). A detector's ``config`` is its
    :class:`~refghost.detector.spec.DetectorConfig`'s fields with ``arch`` "detector" and a one-line
    ``summary``, plus its ``class_names``."""
    import dataclasses

    from .weights import config_arch, describe_config, is_detector

    from .safe_io import attribute, open_hdf5
    from .verify import golden as golden_file

    with open_hdf5(path, RefghostError, "weights or golden") as f:
        fmt = attribute(f, "format", path, RefghostError, "str", default="")
    if fmt == golden_file.FORMAT:
        golden = golden_file.read_golden(path)
        weights, extra = golden.weights, {
            "kind": "golden", "input_shape": list(golden.input.shape), "outputs": list(golden.outputs),
            "intermediates": len(golden.intermediates),
            "attributes": {k: (v.item() if hasattr(v, "item") else v) for k, v in golden.attrs.items()}}
        if golden.detector:
            extra["detections"] = len(golden.detector["detections.scores"])
    else:
        from .weights import load_weights

        weights = load_weights(path)
        extra = {"kind": "weights", "sha256": weights.sha256}
    cfg, pre = weights.config, weights.preprocessing
    trainable = sum(a.size for k, a in weights.tensors.items() if not k.endswith(("running_mean", "running_var")))
    if is_detector(cfg):
        config = {"arch": config_arch(cfg), "summary": describe_config(cfg), **dataclasses.asdict(cfg),
                  "class_names": list(weights.class_names)}
    else:
        config = {"arch": cfg.arch, "width": cfg.width, "activation": cfg.activation,
                  "out_stages": list(cfg.out_stages), "num_classes": cfg.num_classes, "folded": cfg.folded}
    return {"file": path, "valid": True, **extra, "config": config,
            "preprocessing": {"mean": list(pre.mean), "std": list(pre.std), "channel_order": pre.channel_order,
                              "input_size": list(pre.input_size), "keep_ratio": pre.keep_ratio},
            "provenance": dict(weights.provenance), "tensors": len(weights.tensors),
            "parameters": int(trainable), "values": int(sum(a.size for a in weights.tensors.values()))}
