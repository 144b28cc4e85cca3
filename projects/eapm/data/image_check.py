"""The per-image checks of a dataset (``eapm.data.validate``), run in a thread pool with a
progress bar (a terminal) or progress log lines (a log file).

What each level costs, per image:

* ``"exists"``: one ``stat`` (size and mtime, also the cache's key);
* ``"header"``: + ``PIL.Image.open``, which reads only the header: format, mode, size and,
  for JPEG / TIFF / WebP, the EXIF orientation (detectron2's ``read_image`` applies it, so
  the size is compared after it). A few KB read; finds missing, unreadable, non-image and
  wrongly sized files, not a truncated or corrupt pixel stream;
* ``"decode"``: + decoding every pixel (``Image.load``) and the conversion to RGB that
  detectron2's reader makes: the only way to find a truncated or corrupt file (what ends a
  training run mid-way with ``OSError: image file is truncated``), about the cost of
  reading the image once more.

Threads, not processes: Pillow releases the GIL while it decodes and the kernel while it
reads, and a thread pool needs no fork of a process that may hold CUDA or a process group.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = ["LEVELS", "ImageJob", "ImageResult", "inspect_image", "run_image_checks"]

LEVELS = {"exists": 0, "header": 1, "decode": 2}
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # transpose / rotate 90 / transverse / rotate 270
_LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class ImageJob:
    """One image of a dataset: its position in the json, id, ``file_name`` as in the json,
    absolute path and the json's width and height (pixels)."""

    index: int
    image_id: object
    file_name: str
    path: str
    width: float
    height: float


@dataclass(frozen=True)
class ImageResult:
    """``problem``: None (fine) or "missing", "unreadable", "not_image", "corrupt", "size"
    with ``detail`` (the error text, or the found ``WxH``); ``signature``: (size, mtime_ns)
    of the file; ``level``: the level it passed; ``mode``: its Pillow mode (None at level
    "exists"); ``cached``: taken from an earlier check of the unchanged file."""

    problem: Optional[str] = None
    detail: str = ""
    signature: Optional[Tuple[int, int]] = None
    level: int = 0
    mode: Optional[str] = None
    cached: bool = False


def inspect_image(path: str, decode: bool) -> Tuple[Optional[Tuple[str, str]], str, int, int]:
    """Open ``path`` with Pillow: ``(problem, mode, width, height)`` where ``problem`` is
    None or ``(kind, error text)`` and (width, height) are after EXIF orientation. With
    ``decode`` every pixel is decoded and converted to RGB (as detectron2's reader does).
    Never raises for a bad file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            if decode:
                im.load()
                im.convert("RGB")
                orientation = _orientation(im)
            elif im.format == "PNG" and "exif" not in im.info:
                orientation = None  # Pillow would decode the whole PNG to look for eXIf
            else:
                orientation = _orientation(im)
    except PermissionError as e:
        return ("unreadable", str(e)), "", 0, 0
    except UnidentifiedImageError as e:
        return ("not_image", str(e)), "", 0, 0
    except Exception as e:  # noqa: B902  (any decoder error: a bad file, not a bug here)
        return ("corrupt", f"{type(e).__name__}: {e}"), "", 0, 0
    if orientation in _SWAPS_SIDES:
        w, h = h, w
    return None, mode, w, h


def _orientation(im) -> Optional[int]:
    try:
        return im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: B902  (detectron2's reader ignores a broken EXIF block too)
        return None


def _check_one(job: ImageJob, level: int, known: Optional[Tuple]) -> ImageResult:
    try:
        st = os.stat(job.path)
    except FileNotFoundError:
        return ImageResult("missing")
    except OSError as e:
        return ImageResult("unreadable", str(e))
    if not stat_module.S_ISREG(st.st_mode):
        return ImageResult("missing")
    sig = (st.st_size, st.st_mtime_ns)
    if (
        known is not None
        and known[0] == sig
        and known[1] >= level
        and known[3:] == (job.width, job.height)
    ):
        return ImageResult(signature=sig, level=known[1], mode=known[2], cached=True)
    if level == 0:
        return ImageResult(signature=sig)
    problem, mode, w, h = inspect_image(job.path, decode=level >= 2)
    if problem is not None:
        return ImageResult(*problem, signature=sig)
    if (w, h) != (job.width, job.height):
        return ImageResult("size", f"{w}x{h}", signature=sig, mode=mode)
    return ImageResult(signature=sig, level=level, mode=mode)


def _check_chunk(chunk: Sequence[ImageJob], level: int, known: Dict) -> List[ImageResult]:
    return [_check_one(j, level, known.get(j.file_name)) for j in chunk]


def run_image_checks(
    jobs: Sequence[ImageJob],
    level: int,
    known: Dict[str, Tuple],
    num_workers: int = 0,
    desc: str = "Checking images",
) -> List[ImageResult]:
    """Check ``jobs`` at ``level`` (a value of ``LEVELS``) in ``num_workers`` threads
    (0 = ``min(32, os.cpu_count())``); ``known`` maps a file_name to ``((size, mtime_ns),
    level, mode, width, height)`` of an earlier passed check, reused while the file and
    the json's size of it are unchanged.
    Returns one ``ImageResult`` per job, in the jobs' order (so the first bad image
    reported is the first in the json, whatever the threads' timing)."""
    if not jobs:
        return []
    workers = num_workers if num_workers > 0 else min(32, os.cpu_count() or 1)
    workers = min(workers, len(jobs))
    size = max(1, min(256, len(jobs) // (workers * 8)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    results: List[Optional[ImageResult]] = [None] * len(jobs)
    progress = _Progress(len(jobs), desc)
    try:
        if workers == 1:
            for chunk in chunks:
                _store(results, chunk, _check_chunk(chunk, level, known))
                progress.update(len(chunk))
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="eapm-check") as pool:
                futures = {pool.submit(_check_chunk, c, level, known): c for c in chunks}
                for f in as_completed(futures):
                    _store(results, futures[f], f.result())
                    progress.update(len(futures[f]))
    finally:
        progress.close()
    return results  # type: ignore[return-value]


def _store(results: List, chunk: Sequence[ImageJob], out: Sequence[ImageResult]) -> None:
    for j, r in zip(chunk, out):
        results[j.index] = r


class _Progress:
    """tqdm on a terminal; elsewhere (a log file) a log line every 30 s."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= _LOG_EVERY_S and self.done < self.total:
            self.last = now
            logger.info(
                f"{self.desc}: {self.done}/{self.total} images, " f"{now - self.t0:.0f} s elapsed"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
