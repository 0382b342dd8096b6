"""Image-level, source-stratified train/val/test split.

Every question about one image lands in the same split (a model must never be scored on an image it trained
on), and each source (Polyps, Instrument, ...) is divided in the same proportions. Written by hand because
scikit-learn's group splitters either ignore stratification (GroupShuffleSplit) or only produce k equal folds
(StratifiedGroupKFold), not 70/15/15, and it is twenty lines.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping

from surgvqa.data.records import SPLITS


def _allocate(count: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder allocation of ``count`` items, giving every non-empty split one item when possible."""
    exact = [count * fraction for fraction in fractions]
    sizes = [int(value) for value in exact]
    by_remainder = sorted(range(3), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: count - sum(sizes)]:
        sizes[i] += 1
    for i in range(3):
        if sizes[i] == 0 and fractions[i] > 0 and count >= 3:
            donor = max(range(3), key=lambda j: sizes[j])
            sizes[donor] -= 1
            sizes[i] += 1
    return sizes


def split_images(source_by_image: Mapping[str, str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 42) -> dict[str, str]:
    """Map each img_id to "train", "val" or "test"; deterministic for a seed whatever the input order."""
    images_by_source: dict[str, list[str]] = defaultdict(list)
    for img_id, source in source_by_image.items():
        images_by_source[source].append(img_id)
    assignment: dict[str, str] = {}
    for source in sorted(images_by_source):
        images = sorted(images_by_source[source])
        random.Random(f"{seed}:{source}").shuffle(images)
        sizes = _allocate(len(images), fractions)
        start = 0
        for name, size in zip(SPLITS, sizes):
            for img_id in images[start : start + size]:
                assignment[img_id] = name
            start += size
    _fill_empty_splits(assignment, images_by_source, fractions)
    return assignment


def _fill_empty_splits(assignment: dict[str, str], images_by_source: Mapping[str, list[str]],
                       fractions: tuple[float, float, float]) -> None:
    """Give a requested split that the per-source allocation left empty one image from the largest split.

    Sources with fewer than three images each go wholly to training, so twelve images from twelve sources would
    otherwise make an empty validation and test split. The image moved is the last (in sorted order) of the
    largest split's largest source, so the result stays deterministic.
    """
    for name, fraction in zip(SPLITS, fractions):
        members = Counter(assignment.values())
        if fraction <= 0 or members[name] or len(assignment) < sum(f > 0 for f in fractions):
            continue
        donor = max((split for split in SPLITS if members[split] > 1), key=lambda split: members[split], default=None)
        if donor is None:
            return
        per_source = {source: sorted(i for i in images if assignment[i] == donor)
                      for source, images in sorted(images_by_source.items())}
        largest = max(per_source, key=lambda source: len(per_source[source]))
        assignment[per_source[largest][-1]] = name
