"""Detections drawn on their image, and written as JSON: what ``refghost run --draw / --json``
give for a detector."""

from __future__ import annotations

import json
import os

import numpy as np

from ..atomic import atomic_path
from ..errors import RefghostError
from .classes import class_name

#: Box outline width in pixels, and the colours cycled through by label (RGB).
LINE_WIDTH = 2
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def detection_records(result: dict, class_names: tuple[str, ...], num_classes: int) -> list[dict]:
    """The kept detections of a :func:`refghost.detector.run.run_detector` result as a list of
    ``{"image", "box", "score", "label", "class"}`` (box ``[x1, y1, x2, y2]`` in original-image
    pixels, ``image`` the row of the batch), in the result's order."""
    records = []
    for image, box, score, label in zip(result["detections.image"], result["detections.boxes"],
                                        result["detections.scores"], result["detections.labels"]):
        records.append({"image": int(image), "box": [float(v) for v in box], "score": float(score),
                        "label": int(label), "class": class_name(int(label), class_names, num_classes)})
    return records


def write_json(path, records: list[dict]) -> None:
    """Write ``records`` to ``path`` as a JSON list, atomically."""
    with atomic_path(os.fspath(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def draw_detections(image_path, records: list[dict], out_path) -> None:
    """Draw ``records`` (one image's) on the image file ``image_path`` and write ``out_path``
    (any format Pillow writes, by extension), atomically: each box outlined in its label's
    colour, with ``class score`` above it."""
    from PIL import Image, ImageDraw

    from ..preprocess import read_image

    rgb = read_image(image_path, "RGB")  # as refghost read it: EXIF orientation applied, 3 channels
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    pen = ImageDraw.Draw(picture)
    for r in records:
        colour = COLOURS[r["label"] % len(COLOURS)]
        x1, y1, x2, y2 = r["box"]
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=LINE_WIDTH)
        text = f"{r['class']} {r['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        lift = bottom - top + 2
        pen.rectangle([x1, y1 - lift, x1 + right - left + 2, y1], fill=colour)
        pen.text((x1 + 1, y1 - lift), text, fill=(255, 255, 255))
    extension = os.path.splitext(os.fspath(out_path))[1].lower()
    fmt = Image.registered_extensions().get(extension)
    if fmt is None:
        raise RefghostError(f"--draw {out_path}: unknown image extension {extension!r} (use .png or .jpg)")
    with atomic_path(os.fspath(out_path)) as tmp:
        picture.save(tmp, format=fmt)
