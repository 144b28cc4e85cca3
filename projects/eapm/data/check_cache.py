"""The cache of dataset checks (``eapm.data.validate.check_coco_dataset``).

One json file per (annotation json, image folder) in ``cache_dir()``: ``$EAPM_CACHE``,
else ``$XDG_CACHE_HOME/eapm``, else ``~/.cache/eapm`` (never the repository), in its
``dataset_checks/`` folder. It holds the json file's (size, mtime_ns) with the summary of
its json-level checks, and per image the json's id / width / height and the (size, mtime_ns)
of the file with the level it passed. A later check

* skips the json-level checks (and the parse) while the json's size and mtime are unchanged;
* ``stat``s every image and opens only those whose size or mtime changed (or that passed a
  lower level than asked).

Written atomically (a temporary file renamed), so processes checking at once never read
half a file; an unreadable or outdated entry is ignored, an unwritable folder only logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from .image_check import ImageJob, ImageResult

logger = logging.getLogger(__name__)

# bump when what the checks find changes: older entries are then ignored
VERSION = 2  # 2: segmentation, id types and trainable annotations are checked


def cache_dir() -> str:
    """The folder of the cached checks (not created here)."""
    base = os.environ.get("EAPM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "eapm",
    )
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "dataset_checks")


def entry_path(json_file: str, image_root: str) -> str:
    key = hashlib.sha1(f"{json_file}\0{image_root}".encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), f"{os.path.basename(json_file)}.{key}.json")


def file_signature(path: str) -> Tuple[int, int]:
    """(size in bytes, mtime in ns) of ``path``; raises FileNotFoundError."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def load(json_file: str, image_root: str) -> Optional[Dict]:
    """The cached entry of this dataset, or None (none, unreadable, or another version)."""
    path = entry_path(json_file, image_root)
    try:
        with open(path) as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning(f"Ignoring the unreadable dataset-check cache {path} ({e})")
        return None
    ok = (
        isinstance(entry, dict)
        and entry.get("version") == VERSION
        and entry.get("json_file") == json_file
        and entry.get("image_root") == image_root
    )
    return entry if ok else None


def jobs_of(entry: Dict, image_root: str) -> List[ImageJob]:
    """The images of a cached entry, in the json's order."""
    return [
        ImageJob(i, iid, fname, os.path.join(image_root, fname), w, h)
        for i, (fname, iid, w, h, *_) in enumerate(entry["images"])
    ]


def known_images(entry: Dict) -> Dict[str, Tuple]:
    """file_name -> ((size, mtime_ns), level, mode, width, height) of the images that
    passed (width and height: the json's)."""
    return {
        fname: (tuple(sig), level, mode, w, h)
        for fname, _, w, h, sig, level, mode in entry["images"]
        if sig is not None
    }


def store(
    json_file: str,
    image_root: str,
    json_sig: Tuple[int, int],
    summary: Dict,
    jobs: Sequence[ImageJob],
    results: Sequence[ImageResult],
) -> Optional[str]:
    """Write the entry of a passed check; returns its path, or None if it could not be
    written (logged)."""
    path = entry_path(json_file, image_root)
    entry = {
        "version": VERSION,
        "json_file": json_file,
        "image_root": image_root,
        "json": list(json_sig),
        "summary": summary,
        "images": [
            [j.file_name, j.image_id, j.width, j.height, r.signature, r.level, r.mode]
            for j, r in zip(jobs, results)
        ],
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        logger.warning(f"Could not write the dataset-check cache {path} ({e})")
        return None
    return path
