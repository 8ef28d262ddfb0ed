"""What a checkpoint records of the data it was trained on, and how two such records differ.

Identity is the dataset's name, class names, image size and channels: a model trained on other
data is refused (teachers.allow_other_data lets it through). The normalisation (train mean and
std) is information, not identity: code that re-normalises a model's input reads it here.
"""

from __future__ import annotations

IDENTITY = ("name", "num_classes", "classes", "image_size", "channels")


def dataset_record(splits) -> dict:
    """{name, classes, num_classes, channels, image_size, mean, std} of DatasetSplits; for video splits
    classes (they are numbered), image_size, mean and std are None."""
    train = splits.train
    classes = getattr(train, "classes", None)
    size = getattr(splits, "image_size", None)
    return {"name": splits.name,
            "classes": list(classes) if classes is not None else None,
            "num_classes": splits.num_classes, "channels": splits.in_channels,
            "image_size": list(size) if size is not None else None,
            "mean": list(splits.mean) if hasattr(splits, "mean") else None,
            "std": list(splits.std) if hasattr(splits, "std") else None}


def describe(record: dict) -> str:
    """'digits (8x8, 1 channel, classes 0, 1, ..., 9)'."""
    parts = []
    if record.get("image_size"):
        parts.append("x".join(str(s) for s in record["image_size"]))
    if record.get("channels") is not None:
        parts.append(f"{record['channels']} channel{'s' if record['channels'] != 1 else ''}")
    classes = record.get("classes") or []
    if classes:
        shown = classes if len(classes) <= 4 else [*classes[:3], "...", classes[-1]]
        parts.append("classes " + ", ".join(shown))
    return f"{record.get('name')} ({', '.join(parts)})" if parts else str(record.get("name"))


def identity_difference(trained: dict | None, current: dict) -> list[str]:
    """The identity keys on which a model's data differs from this run's (none when the model
    recorded no data: files from before records, or weights from elsewhere)."""
    if not trained:
        return []
    keys = [k for k in IDENTITY if k in trained and k in current and trained[k] != current[k]]
    return [k.replace("_", " ") for k in keys]
