"""Class names: the 80 COCO categories in the order NanoDet's COCO configs list them
(``class_names`` of ``config/nanodet-plus-m_320.yml``: COCO's category ids 1..90 with the ten
unused ids removed), so label ``i`` of a detector trained on COCO is ``COCO_CLASSES[i]``."""

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic_light", "fire_hydrant", "stop_sign", "parking_meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports_ball", "kite",
    "baseball_bat", "baseball_glove", "skateboard", "surfboard", "tennis_racket", "bottle",
    "wine_glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot_dog", "pizza", "donut", "cake", "chair", "couch", "potted_plant",
    "bed", "dining_table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell_phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy_bear", "hair_drier", "toothbrush",
)


def class_name(label: int, names: tuple[str, ...], num_classes: int) -> str:
    """The name of class ``label``: from ``names`` if given, COCO's if the network has 80
    classes and no names, else ``class <label>``."""
    if names:
        return names[label]
    if num_classes == len(COCO_CLASSES):
        return COCO_CLASSES[label]
    return f"class {label}"
