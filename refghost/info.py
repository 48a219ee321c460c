"""What a refghost file holds: :func:`describe`, behind ``refghost info``.

A weights file (``docs/weights-format.md``) or a golden file (``docs/golden-format.md``) is read
in full through its own validating reader, then summarised as a dict (``refghost info --json``
prints it as is; ``refghost info`` as lines, its text through :func:`escaped`).

The file is read in a child process (:func:`refghost.isolate.call_isolated`): a corrupt file on
which HDF5 hangs or crashes ends as one error after :data:`READ_TIMEOUT` seconds.
"""

from __future__ import annotations

from .errors import RefghostError

#: Wall time the reading of a file may take: a 294 MB golden with intermediates takes 0.5 s
#: (1 s on a busy machine); a minute still ends a hang.
READ_TIMEOUT = 60.0
#: Address space the reading may add to refghost's: reading holds the file's tensors once (the
#: readers cap each tensor's declared size by what the file stores), 300 MB for that golden.
READ_MEMORY = 8 << 30


def describe(path: str, *, timeout: float | None = None) -> dict:
    """:func:`read_file`, with the file read in a child process given ``timeout`` seconds
    (default :data:`READ_TIMEOUT`) and :data:`READ_MEMORY` bytes: a crash, a hang or an
    allocation without end raises :class:`~refghost.errors.IsolationError`, a special file
    (FIFO, device, folder) is refused before it is opened. Error messages are
    :func:`~refghost.safe_io.printable`."""
    from .isolate import call_isolated
    from .safe_io import check_regular_file, printable

    try:
        check_regular_file(path, "weights or golden file")
        return call_isolated(read_file, path, who="HDF5", doing=f"reading {path}",
                             timeout=READ_TIMEOUT if timeout is None else timeout, memory=READ_MEMORY)
    except RefghostError as exc:
        if printable(str(exc)) == str(exc):
            raise
        raise type(exc)(printable(str(exc))) from None


def escaped(value):
    """``value`` (a :func:`describe` dict) with every string in it, keys too, made
    :func:`~refghost.safe_io.printable`: what ``refghost info`` prints."""
    from .safe_io import printable

    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(escaped(v) for v in value)
    return value


def read_file(path: str) -> dict:
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
