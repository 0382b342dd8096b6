from collections import Counter

from surgvqa.data.split import split_images

SOURCES = ["Ulcerative Colitis", "Polyps", "Esophagitis", "Instrument", "Normal"]


def _images(n: int) -> dict[str, str]:
    return {f"img{i:05d}": SOURCES[i % len(SOURCES)] for i in range(n)}


def test_every_image_in_exactly_one_split_with_ratios_within_one_percent():
    images = _images(1200)
    assignment = split_images(images, (0.7, 0.15, 0.15), seed=42)
    assert set(assignment) == set(images)  # one split per img_id: no overlap by construction, none lost
    counts = Counter(assignment.values())
    for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(counts[name] / len(images) - fraction) <= 0.01


def test_same_seed_same_split_and_input_order_does_not_matter():
    images = _images(500)
    first = split_images(images, seed=7)
    reordered = dict(reversed(list(images.items())))
    assert split_images(reordered, seed=7) == first
    assert split_images(images, seed=8) != first


def test_every_source_present_in_every_split():
    images = _images(1000)
    assignment = split_images(images, seed=1)
    for source in SOURCES:
        splits = {assignment[i] for i, s in images.items() if s == source}
        assert splits == {"train", "val", "test"}


def test_small_source_still_reaches_every_split():
    images = {"a": "Rare", "b": "Rare", "c": "Rare", **_images(100)}
    assignment = split_images(images, seed=3)
    assert {assignment[i] for i in "abc"} == {"train", "val", "test"}
