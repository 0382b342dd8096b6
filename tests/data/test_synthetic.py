"""The synthetic Kvasir-VQA look-alike: schema, vocabulary, noise, determinism, and answers the pixels carry."""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from surgvqa.data import synthetic as syn

CELLS = ["upper-left", "upper-center", "upper-right", "center-left", "center", "center-right",
         "lower-left", "lower-center", "lower-right"]
COLOURS = ["pink", "red", "white", "yellow", "flesh", "brown", "grey", "green", "blue", "black", "orange",
           "purple", "none"]
# Written out from kvasir-vqa.md (not imported from the module) so that the test checks the module.
VOCAB = {
    "Is there text?": {"yes", "no"},
    "Is this finding easy to detect?": {"yes", "no", "not relevant"},
    "What type of procedure is the image taken from?": {"colonoscopy", "gastroscopy", "capsule endoscopy"},
    "Have all polyps been removed?": {"yes", "no", "not relevant"},
    "Is there a green/black box artefact?": {"yes", "no"},
    "How many instrumnets are in the image?": {"0", "1", "2", "3"},
    "How many findings are present?": {str(i) for i in range(10)},
    "What type of polyp is present?": {"none", "paris ip", "paris is", "paris iia"},
    "What is the size of the polyp?": {"none", "<5mm", "5-10mm", "11-20mm", ">20mm", ">20"},
    "Where in the image is the instrument?": set(CELLS) | {"lower-rigth"},
    "How many polyps are in the image?": {str(i) for i in range(7)} | {"16"},
    "Are there any instruments in the image? Check all that are present.":
        {"none", "tube", "biopsy forceps", "polyp snare", "metal clip", "injection needle"},
    "What color is the abnormality? If more than one separate with ;": set(COLOURS),
    "Are there any abnormalities in the image? Check all that are present.":
        {"polyp", "ulcerative colitis", "oesophagitis", "barretts", "short-segment barretts", "hemorrhoids",
         "none"},
    "Where in the image is the abnormality?": set(CELLS) | {"lower-rigth"},
    "Does this image contain any finding?": {"yes", "no"},
    "Where in the image is the anatomical landmark?": set(CELLS) | {"lower-rigth"},
    "Are there any anatomical landmarks in the image? Check all that are present.":
        {"none", "z-line", "cecum", "ileum", "pylorus"},
    "What color is the anatomical landmark? If more than one separate with ;": set(COLOURS),
}
SOURCES = {"Ulcerative Colitis", "Polyps", "Esophagitis", "Instrument", "Normal"}
SEED, N = 0, 300


def labels(answer: str) -> set[str]:
    """An answer as a set of canonical labels (the noise the real data has undone)."""
    fixed = {"lower-rigth": "lower-right", ">20": ">20mm"}
    return {fixed.get(x.strip(), x.strip()) for x in answer.split(";")}


def is_bad(answer: str) -> bool:
    return answer.strip() in ("", "nan")


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return syn.make_synthetic(tmp_path_factory.mktemp("synth"), images=N, seed=SEED)


@pytest.fixture(scope="module")
def rows(parquet):
    return pq.read_table(parquet).to_pylist()


@pytest.fixture(scope="module")
def many_rows():
    """More rows, without images' parquet round trip, for the rarer noise."""
    return list(syn.synthetic_rows(images=1500, seed=SEED))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = syn.make_synthetic(tmp_path / "a", images=40, seed=7)
    b = syn.make_synthetic(tmp_path / "b", images=40, seed=7)
    c = syn.make_synthetic(tmp_path / "c", images=40, seed=8)
    assert a.name == "kvasir_vqa_synthetic.parquet"
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert "seed=7" in (tmp_path / "a" / "README.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.txt", "kvasir_vqa_synthetic.parquet"]


def test_schema_is_the_hugging_face_kvasir_vqa_schema(parquet):
    schema = pq.read_schema(parquet)
    assert schema.names == ["image", "source", "question", "answer", "img_id"]
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name in schema.names[1:]:
        assert schema.field(name).type == pa.string()
    assert b'"image": {"_type": "Image"}' in schema.metadata[b"huggingface"]


def test_hugging_face_datasets_reads_image_feature(parquet):
    import datasets
    features = datasets.Features.from_arrow_schema(pq.read_schema(parquet))
    assert isinstance(features["image"], datasets.Image)


def test_every_question_and_source_occurs_and_answers_are_in_vocabulary(rows):
    assert len(syn.QUESTIONS) == 19 and set(syn.QUESTIONS) == set(VOCAB)
    assert {r["question"] for r in rows} == set(VOCAB)
    assert {r["source"] for r in rows} == SOURCES
    for r in rows:
        if not is_bad(r["answer"]):
            raw = {x.strip() for x in r["answer"].split(";")}
            assert raw <= VOCAB[r["question"]], r
            assert r["answer"] == r["answer"].lower()


def test_rows_per_image_and_normal_images(rows):
    by_image = defaultdict(list)
    for r in rows:
        by_image[r["img_id"]].append(r)
    assert len(by_image) == N
    assert set(by_image) == {f"synth_{i:05d}" for i in range(N)}
    for img_id, rs in by_image.items():
        assert len({r["image"]["bytes"] for r in rs}) == 1 and rs[0]["image"]["path"] == f"{img_id}.png"
        assert len({r["question"] for r in rs}) == len(rs)
        if rs[0]["source"] == "Normal":
            assert [r["question"] for r in rs] == ["Does this image contain any finding?"]
            assert rs[0]["answer"] in ("no", "nan", "")
        else:
            assert 8 <= len(rs) <= 10, img_id
    assert 7.0 <= len(rows) / N <= 10.0


def test_real_data_noise_occurs(rows, many_rows):
    answers = [r["answer"] for r in many_rows]
    bad = [a for a in answers if is_bad(a)]
    assert "nan" in bad and "" in bad
    assert 0.001 <= len(bad) / len(answers) <= 0.015
    assert any(re.search(r";\S", a) for a in answers)
    assert any("; " in a for a in answers)
    assert any("lower-rigth" in a for a in answers)
    assert ">20" in answers and ">20mm" in answers
    # Label order is not canonical: some pair occurs in both orders.
    pairs = {tuple(x.strip() for x in a.split(";")) for a in answers if a.count(";") == 1}
    assert any((b, a) in pairs for a, b in pairs)
    # Multi-label answers are common but not the rule (about one in eight in Kvasir-VQA).
    multi = sum(";" in a for a in answers) / len(answers)
    assert 0.05 < multi < 0.35
    # The parquet carries the same noise.
    assert any(";" in r["answer"] for r in rows)


def test_parquet_rows_equal_the_regenerated_scene(rows):
    """Every stored image is the render of its scene, and every answer is the scene's (up to the noise)."""
    by_image = defaultdict(list)
    for r in rows:
        by_image[r["img_id"]].append(r)
    for index in range(0, N, 7):
        scene = syn.make_scene(SEED, index)
        rs = by_image[scene.img_id]
        image = Image.open(io.BytesIO(rs[0]["image"]["bytes"]))
        assert image.format == "PNG" and image.size == (112, 112)
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(syn.render_scene(scene, 112)))
        truth = syn.scene_answers(scene)
        for r in rs:
            assert r["source"] == scene.source
            if is_bad(r["answer"]):
                continue
            got, want = labels(r["answer"]), set(truth[r["question"]])
            if r["question"] == "What is the size of the polyp?":  # the rare list-every-bin answer
                assert max(got, key=["none", "<5mm", "5-10mm", "11-20mm", ">20mm"].index) == max(
                    want, key=["none", "<5mm", "5-10mm", "11-20mm", ">20mm"].index)
            else:
                assert got == want, (scene.img_id, r["question"], r["answer"], want)


def _pixel(img: np.ndarray, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in img[xy[1], xy[0]])


def test_answers_are_visible_in_the_pixels():
    size = 112
    checked = Counter()
    for index in range(400):
        scene = syn.make_scene(SEED, index)
        img = np.asarray(syn.render_scene(scene, size))
        ans = syn.scene_answers(scene)
        background = syn.BACKGROUNDS[scene.procedure]
        # Procedure = background tone, visible at the centre of every empty cell.
        for cell in set(range(9)) - scene.occupied:
            assert _pixel(img, syn.cell_centre(cell, size)) == background
            checked["empty"] += 1
        # Abnormality location + colour: the stated colour sits at the centre of every stated cell.
        if scene.source != "Normal" and "Where in the image is the abnormality?" in ans:
            colours = {syn.PALETTE[c] for c in ans["What color is the abnormality? If more than one separate with ;"]}
            seen = set()
            for name in ans["Where in the image is the abnormality?"]:
                px = _pixel(img, syn.cell_centre(CELLS.index(name), size))
                assert px in colours
                seen.add(px)
            assert seen == colours  # and every stated colour is drawn somewhere
            checked["abnormality"] += 1
        # Every polyp (so the polyp count) shows its colour at its cell centre.
        for p in scene.polyps:
            assert _pixel(img, syn.cell_centre(p.cell, size)) == syn.PALETTE[p.colour]
        # Landmark colour: the landmark's pixels carry the stated colour inside its cell.
        for lm in scene.landmarks:
            cx, cy = syn.cell_centre(lm.cell, size)
            patch = img[cy - 18:cy + 18, cx - 18:cx + 18].reshape(-1, 3)
            assert (patch == syn.PALETTE[lm.colour]).all(axis=1).sum() > 20
            checked["landmark"] += 1
        # Overlays: text box top-left, green/black box lower-left.
        if scene.procedure != "capsule endoscopy":
            assert (_pixel(img, (1, 1)) == (255, 255, 255)) == scene.text
            corner = _pixel(img, (0, size - 1))
            assert corner == (syn.BOX_COLOURS[scene.box] if scene.box else background)
        else:
            assert _pixel(img, (0, 0)) == (0, 0, 0) and not scene.text and scene.box is None
    assert checked["empty"] > 1000 and checked["abnormality"] > 200 and checked["landmark"] > 30


@pytest.mark.parametrize("image_size", [112, 224])
def test_size_bins_have_increasing_disc_areas(image_size):
    areas = []
    for size_bin in ["<5mm", "5-10mm", "11-20mm", ">20mm"]:
        scene = syn.Scene(img_id="t", source="Polyps", procedure="colonoscopy",
                          polyps=(syn.Polyp(cell=4, colour="green", size=size_bin, kind="paris is"),),
                          occupied=frozenset({4}))
        img = np.asarray(syn.render_scene(scene, image_size))
        area = int((img == syn.PALETTE["green"]).all(axis=2).sum())
        r = syn.polyp_radius(size_bin, image_size)
        assert abs(area - np.pi * r * r) < 0.25 * np.pi * r * r
        areas.append(area)
    assert all(b > 1.5 * a for a, b in itertools.pairwise(areas))
    # Even the largest disc stays inside its cell.
    assert 2 * syn.polyp_radius(">20mm", image_size) < image_size / 3


def test_image_size_is_respected(tmp_path):
    path = syn.make_synthetic(tmp_path, images=5, seed=1, image_size=160)
    row = pq.read_table(path).slice(0, 1).to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (160, 160)
    with pytest.raises(ValueError):
        syn.make_synthetic(tmp_path, images=0)
