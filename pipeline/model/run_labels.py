"""The class names a training run writes beside its model (``labels.json``), read back for what is made from it."""

from __future__ import annotations

import json
from pathlib import Path


def labels_beside(model_path: Path) -> list[str] | None:
    """Class names from a training run's labels.json (``{"classes": [...]}`` or a plain list), or None."""
    candidate = (model_path if model_path.is_dir() else model_path.parent) / "labels.json"
    if not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        return [str(c) for c in data["classes"]]
    if isinstance(data, list):
        return [str(c) for c in data]
    return None
