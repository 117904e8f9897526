"""Prompt sets: the project's default set and loaders for the files users bring.

load_prompts(spec) -> [{"prompt", "category", "source"}], where spec is
  "default"                      prompts/default.tsv (210 project-authored prompts, 6 categories)
  "path/to/file.ext"             format from the extension: .csv DrawBench, .tsv PartiPrompts, .json COCO, .txt text
  "format:path"                  explicit format: drawbench, parti, coco, text, default (our TSV: prompt, category),
                                 edits (a TSV of prompt, image[, category]: an input image per prompt for
                                 FLUX.1-Kontext editing sweeps, paths relative to the file's folder)
COCO captions: the first caption (lowest annotation id) of each image, images in image_id order, so that
one image never weighs more than another.
limit: keep that many prompts, a deterministic sample (seeded shuffle, then original order) unless limit
covers all of them.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "default.tsv"
EXTENSION_FORMATS = {".csv": "drawbench", ".tsv": "parti", ".json": "coco", ".txt": "text"}


def _read_table(path: Path, delimiter: str, required: tuple[str, ...], format_name: str) -> list[dict]:
    # QUOTE_NONE for TSVs: prompts contain literal quotes ("a sign that says "OPEN"").
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter=delimiter, quoting=quoting)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(f"{path}: {format_name} file lacks column(s) {missing}; found columns {header}")
        return [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]


def load_drawbench(path: Path) -> list[dict]:
    """DrawBench CSV: columns Prompts, Category (extra columns ignored)."""
    rows = _read_table(path, ",", ("Prompts", "Category"), "DrawBench CSV")
    return [{"prompt": row["Prompts"], "category": row["Category"], "source": "drawbench"} for row in rows]


def load_parti(path: Path) -> list[dict]:
    """PartiPrompts TSV: columns Prompt, Category, Challenge, Note."""
    rows = _read_table(path, "\t", ("Prompt", "Category", "Challenge", "Note"), "PartiPrompts TSV")
    return [{"prompt": row["Prompt"], "category": row["Category"], "source": "parti"} for row in rows]


def load_default_tsv(path: Path) -> list[dict]:
    """The project's own TSV: columns prompt, category."""
    rows = _read_table(path, "\t", ("prompt", "category"), "prompt/category TSV")
    return [{"prompt": row["prompt"], "category": row["category"], "source": path.stem} for row in rows]


def load_coco_captions(path: Path) -> list[dict]:
    """COCO captions JSON (captions_*.json): the first caption of each image."""
    data = json.loads(path.read_text(encoding="utf-8"))
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: not a COCO captions file (no 'annotations' list)")
    first_caption: dict[int, tuple[int, str]] = {}
    for index, annotation in enumerate(annotations):
        if "caption" not in annotation or "image_id" not in annotation:
            raise ValueError(f"{path}: annotation {index} lacks 'caption' or 'image_id'")
        order = annotation.get("id", index)
        image_id = annotation["image_id"]
        if image_id not in first_caption or order < first_caption[image_id][0]:
            first_caption[image_id] = (order, annotation["caption"].strip())
    return [
        {"prompt": caption, "category": "coco", "source": "coco", "image_id": image_id}
        for image_id, (_, caption) in sorted(first_caption.items())
    ]


def load_text(path: Path) -> list[dict]:
    """Plain text: one prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [{"prompt": prompt, "category": "text", "source": path.stem} for prompt in prompts]


def load_edits(path: Path) -> list[dict]:
    """Editing prompts: a TSV with columns prompt and image (a file, relative to the TSV's folder, or an http(s)
    URL), and optionally category. Each item gets the image's path; a missing file is an error naming it."""
    rows = _read_table(path, "\t", ("prompt", "image"), "editing TSV")
    items = []
    for number, row in enumerate(rows, start=2):
        image = row["image"]
        if not image.startswith(("http://", "https://")):
            resolved = (path.parent / image) if not Path(image).is_absolute() else Path(image)
            if not resolved.is_file():
                raise ValueError(f"{path}, line {number}: input image {image} not found (looked for {resolved})")
            image = str(resolved)
        items.append({"prompt": row["prompt"], "category": row.get("category") or "edit", "source": path.stem,
                      "image": image})
    return items


LOADERS = {
    "edits": load_edits,
    "drawbench": load_drawbench,
    "parti": load_parti,
    "coco": load_coco_captions,
    "text": load_text,
    "default": load_default_tsv,
}


def parse_spec(spec: str) -> tuple[str, Path]:
    """'default' | 'format:path' | 'path.ext' -> (format, path)."""
    if spec == "default":
        return "default", DEFAULT_PROMPTS
    head, sep, tail = spec.partition(":")
    if sep and head in LOADERS:
        return head, Path(tail)
    if sep and len(head) > 1 and not Path(spec).exists():  # a 1-letter head is a Windows drive
        raise ValueError(f"unknown prompt format {head!r} in {spec!r}; formats: {sorted(LOADERS)}")
    path = Path(spec)
    if path.suffix.lower() not in EXTENSION_FORMATS:
        raise ValueError(
            f"cannot tell the prompt format of {spec!r} from its extension; use one of "
            f"{sorted(EXTENSION_FORMATS)} or 'FORMAT:PATH' with FORMAT in {sorted(LOADERS)}"
        )
    return EXTENSION_FORMATS[path.suffix.lower()], path


def subsample(prompts: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """Keep `limit` prompts: a seeded sample, returned in the file's order (same input -> same subset)."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise ValueError(f"prompt limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[index] for index in keep]


def load_prompts(spec: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Load a prompt set; each item is {"prompt", "category", "source"} (COCO adds "image_id").

    A file that is missing, a folder, unreadable or not UTF-8 raises an OSError or ValueError whose message
    names it and says which."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise ValueError(f"prompt limit must be an integer >= 1, got {limit!r}")
    format_name, path = parse_spec(spec)
    if path.is_dir():
        raise IsADirectoryError(f"prompt file {path} is a folder (from spec {spec!r})")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (from spec {spec!r})")
    try:
        prompts = [item for item in LOADERS[format_name](path) if item["prompt"]]
    except PermissionError:
        raise PermissionError(f"prompt file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return subsample(prompts, limit, seed)
