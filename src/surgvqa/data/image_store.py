"""The prepared folder's images: each img_id's image decoded, measured in tokens and stored once."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgvqa.core.io import disk_full_error, is_disk_full
from surgvqa.data.images import ImageProblem, decode_image
from surgvqa.data.sources import RawRow

MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize raises above it; used only to name the reason


def _safe_name(img_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", img_id).strip("._") or "image"
    if cleaned != img_id:  # keep distinct ids distinct after cleaning
        cleaned += "-" + hashlib.sha1(img_id.encode()).hexdigest()[:8]
    return cleaned


@dataclass
class StoredImage:
    problem: str | None
    detail: str = ""
    reference: str = ""
    digest: str = ""
    path: Path | None = None
    origin: str = ""  # the first row that carried this img_id with a usable image
    image_tokens: int = 0


class ImageStore:
    """Decodes each img_id's image once, writes embedded bytes to ``images/`` under the prepared folder and
    refuses a later row whose img_id names different image bytes than its first usable image."""

    def __init__(self, prepared_dir: Path, image_tokens: Callable[[int, int], int]):
        self.images_dir = prepared_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.image_tokens = image_tokens
        self.by_id: dict[str, StoredImage] = {}
        # The Kvasir export repeats an image's bytes on each of its question rows, one after the other:
        # comparing with the previous row's bytes spares hashing them again.
        self._previous: tuple[str, bytes] | None = None

    def add(self, raw: RawRow) -> StoredImage:
        img_id = raw.img_id
        known = self.by_id.get(img_id)
        if known is not None:
            if raw.image_file is not None and raw.image_file == known.path:
                return known
            if raw.image_bytes is not None and self._previous == (img_id, raw.image_bytes):
                return known
        # A second image under a known img_id is only compared: writing it would replace the first one's file.
        image = self._load(raw, write=known is None)
        image.origin, image.path = raw.origin, raw.image_file
        if image.problem and known is None:
            # A row whose image cannot be used is rejected alone: the img_id goes to the first row with a usable
            # image, so later rows of it are not refused as conflicts with a missing file.
            return image
        if known is None:
            self.by_id[img_id] = image
        elif not image.digest:  # this row's own file could not be read
            return image
        elif image.digest != known.digest:
            return StoredImage("img_id_conflict", f"img_id {img_id!r} was first read at {known.origin} with "
                                                   f"different image bytes; give each image its own img_id")
        else:
            image = known
        if raw.image_bytes is not None:
            self._previous = (img_id, raw.image_bytes)
        return image

    def _load(self, raw: RawRow, *, write: bool) -> StoredImage:
        if raw.image_bytes is not None:
            data = raw.image_bytes
        elif raw.image_file is not None:
            try:
                data = raw.image_file.read_bytes()
            except OSError as exc:
                return StoredImage("missing_image", f"cannot read image file {raw.image_file} "
                                                     f"({exc.strerror or type(exc).__name__})")
        else:
            return StoredImage("missing_image", "no image")
        digest = hashlib.sha1(data).hexdigest()
        where = str(raw.image_file) if raw.image_file is not None else "embedded image"
        if not data:
            return StoredImage("empty_image", f"{where} has zero bytes", digest=digest)
        try:
            image, image_format = decode_image(data)
        except ImageProblem as exc:
            return StoredImage(exc.reason, f"{where}: {exc}", digest=digest)
        # The processor's own size rule: it refuses an aspect ratio over 200 and scales tiny images up to
        # min_pixels (a 1x1 image encodes as 4 tokens), so tiny images are kept.
        try:
            tokens = self.image_tokens(image.width, image.height)
        except ValueError as exc:
            ratio = max(image.size) / min(image.size)
            reason = "bad_aspect_ratio" if ratio > MAX_ASPECT_RATIO else "image_size_refused"
            return StoredImage(reason, f"{where} is {image.width}x{image.height}; the image processor refuses "
                                        f"it ({exc})", digest=digest)
        if raw.image_file is not None:
            reference = str(raw.image_file)
        else:
            reference = f"images/{_safe_name(raw.img_id)}.{image_format.replace('jpeg', 'jpg')}"
            if write:
                target = self.images_dir.parent / reference
                try:
                    target.write_bytes(data)
                except OSError as exc:  # a failed write() names no file
                    if is_disk_full(exc):
                        raise disk_full_error(target) from None
                    raise
        return StoredImage(None, reference=reference, digest=digest, image_tokens=tokens)
