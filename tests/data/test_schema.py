"""Question typing, candidate vocabularies and answer parsing (pure functions, no model)."""

import math

import pytest

from surgvqa.data.answers import (
    CLOSED_TYPES,
    COLOR,
    COUNT_NUMERIC,
    MCQ,
    OPEN_ENDED,
    QUESTION_TYPES,
    SIZE_NONE,
    SIZE_NUMERIC,
    YES_NO,
    SizeInterval,
    interval_distance_mm,
    is_bad_answer,
    label_set,
    normalize_answer,
    parse_count,
    parse_size_labels,
    parse_size_mm,
    split_labels,
)
from surgvqa.tasks import kvasir_vqa
from surgvqa.tasks.kvasir_vqa import (
    TEMPLATES,
    TypeInfo,
    build_candidate_vocabulary,
    build_candidate_vocabulary_for_split,
    candidates_for,
    infer_question_type,
    typed_record_fields,
)

# The table of kvasir-vqa.md, written out independently of the module under test.
TABLE = [
    (1, "Is there text?", YES_NO, False),
    (2, "Is this finding easy to detect?", YES_NO, False),
    (3, "What type of procedure is the image taken from?", MCQ, False),
    (4, "Have all polyps been removed?", YES_NO, False),
    (5, "Is there a green/black box artefact?", YES_NO, False),
    (6, "How many instrumnets are in the image?", COUNT_NUMERIC, False),
    (7, "How many findings are present?", COUNT_NUMERIC, False),
    (8, "What type of polyp is present?", MCQ, True),
    (9, "What is the size of the polyp?", SIZE_NUMERIC, False),
    (10, "Where in the image is the instrument?", MCQ, True),
    (11, "How many polyps are in the image?", COUNT_NUMERIC, False),
    (12, "Are there any instruments in the image? Check all that are present.", MCQ, True),
    (13, "What color is the abnormality? If more than one separate with ;", COLOR, True),
    (14, "Are there any abnormalities in the image? Check all that are present.", MCQ, True),
    (15, "Where in the image is the abnormality?", MCQ, True),
    (16, "Does this image contain any finding?", YES_NO, False),
    (17, "Where in the image is the anatomical landmark?", MCQ, True),
    (18, "Are there any anatomical landmarks in the image? Check all that are present.", MCQ, True),
    (19, "What color is the anatomical landmark? If more than one separate with ;", COLOR, True),
]


def test_type_constants():
    assert QUESTION_TYPES == ("yes_no", "color", "size_numeric", "count_numeric", "mcq", "open_ended")
    assert CLOSED_TYPES == QUESTION_TYPES[:-1]


def test_template_table_matches_the_documentation():
    assert [(t.id, t.question, t.question_type, t.multi_label) for t in TEMPLATES] == TABLE
    by_id = {t.id: t for t in TEMPLATES}
    assert by_id[6].vocabulary == ("0", "1", "2", "3")
    assert by_id[7].vocabulary == by_id[11].vocabulary == tuple(str(n) for n in range(7))
    assert by_id[9].vocabulary == ("none", "<5mm", "5-10mm", "11-20mm", ">20mm")
    assert by_id[2].vocabulary == ("yes", "no", "not relevant")
    assert "lower-rigth" not in by_id[10].vocabulary and len(by_id[10].vocabulary) == 9
    assert by_id[13].vocabulary == by_id[19].vocabulary and "none" in by_id[13].vocabulary


@pytest.mark.parametrize(("template_id", "question", "question_type", "multi_label"), TABLE)
def test_every_template_types_to_its_row(template_id, question, question_type, multi_label):
    assert infer_question_type(question) == TypeInfo(question_type, template_id, multi_label, ())


@pytest.mark.parametrize(
    ("variant", "template_id"),
    [
        ("is there text", 1),
        ("IS THERE TEXT?", 1),
        ("  Is   there\ttext ?  ", 1),
        ("Is there text.", 1),
        ("Is there a green/black box artifact?", 5),
        ("is there a green / black box ARTIFACT", 5),
        ("How many instruments are in the image?", 6),
        ("how many instrumnets are in the image", 6),
        ("What colour is the abnormality? If more than one separate with ;", 13),
        ("What colour is the abnormality? If more than one, separate with ;", 13),
        ("Are there any instruments in the image?  Check all that are present", 12),
        ("What is the size of the polyps?", 9),  # one-letter slip, caught by the fuzzy match
        ("How many finding are present?", 7),
    ],
)
def test_variants_map_to_the_same_template(variant, template_id):
    assert infer_question_type(variant) == infer_question_type(kvasir_vqa.TEMPLATE_BY_ID[template_id].question)


@pytest.mark.parametrize(
    ("question", "question_type"),
    [
        ("Is the mucosa inflamed?", YES_NO),
        ("Are polyps visible?", YES_NO),
        ("Does the image show bleeding?", YES_NO),
        ("Has the lesion been resected?", YES_NO),
        ("Can you see a polyp?", YES_NO),
        ("Is the polyp larger than 10 mm?", YES_NO),
        ("Are there any polyps or ulcers?", YES_NO),
        ("Is there a polyp or not?", YES_NO),
        ("What colour is the polyp?", COLOR),
        ("Which color is the lesion?", COLOR),
        ("What is the colour of the mucosa?", COLOR),
        ("Describe the colour of the ulcer.", COLOR),
        ("How many polyps can you see?", COUNT_NUMERIC),
        ("Number of instruments visible?", COUNT_NUMERIC),
        ("Count the lesions.", COUNT_NUMERIC),
        ("Can you tell me how many polyps there are?", COUNT_NUMERIC),
        ("What size is the lesion?", SIZE_NUMERIC),
        ("How big is the polyp?", SIZE_NUMERIC),
        ("How large is the ulcer?", SIZE_NUMERIC),
        ("Estimate the polyp diameter in millimetres.", SIZE_NUMERIC),
        ("Give the polyp size in mm.", SIZE_NUMERIC),
        ("Is the polyp pedunculated or sessile?", MCQ),
        ("Which is it: colonoscopy, gastroscopy or capsule endoscopy?", MCQ),
        ("Is it colonoscopy, gastroscopy, or capsule endoscopy?", MCQ),
        ("Is the finding a polyp or ulcerative colitis?", MCQ),
        ("Pedunculated or sessile?", MCQ),
        ("asdf qwerty", OPEN_ENDED),
        ("Describe the image.", OPEN_ENDED),
        ("Describe the image or the polyp.", OPEN_ENDED),
        ("Explain what the endoscopist should do next.", OPEN_ENDED),
        ("", OPEN_ENDED),
    ],
)
def test_unseen_questions_follow_the_rules(question, question_type):
    info = infer_question_type(question)
    assert info.question_type == question_type
    assert info.template is None


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("Is the polyp pedunculated or sessile?", ("pedunculated", "sessile")),
        ("Which is it: colonoscopy, gastroscopy or capsule endoscopy?",
         ("colonoscopy", "gastroscopy", "capsule endoscopy")),
        ("Is it colonoscopy, gastroscopy, or capsule endoscopy?", ("colonoscopy", "gastroscopy", "capsule endoscopy")),
        ("Which procedure was used, colonoscopy or gastroscopy?", ("colonoscopy", "gastroscopy")),
        ("Was the image taken with colonoscopy or capsule endoscopy?", ("colonoscopy", "capsule endoscopy")),
        ("Is the finding a polyp or ulcerative colitis?", ("polyp", "ulcerative colitis")),
    ],
)
def test_explicit_choices_become_options_and_candidates(question, options):
    info = infer_question_type(question)
    assert info.options == options
    assert candidates_for(info, {}) == list(options)


def test_typed_questions_keep_the_options_they_list():
    info = infer_question_type("What color is the polyp, red or pink?")
    assert (info.question_type, info.options) == (COLOR, ("red", "pink"))
    assert candidates_for(info, {}) == ["red", "pink"]


def test_multi_label_cues_for_unseen_questions():
    assert infer_question_type("Which colours are visible? If more than one separate with ;").multi_label
    assert not infer_question_type("What colour is the polyp?").multi_label


def test_non_string_question_is_open_ended():
    assert infer_question_type(None).question_type == OPEN_ENDED  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- candidates

Q_INSTR_LOC = "Where in the image is the instrument?"
Q_COLOR = "What color is the abnormality? If more than one separate with ;"
Q_SIZE = "What is the size of the polyp?"
Q_EASY = "Is this finding easy to detect?"


def test_candidates_merge_documented_vocabulary_with_training_labels():
    train = [
        (Q_INSTR_LOC, "lower-rigth; center"),  # the typo only enters because training answers show it
        (Q_COLOR, "Pink;Red"),
        (Q_COLOR, "teal; pink"),
        (Q_SIZE, "5-10mm;<5mm"),
        (Q_SIZE, ">20"),
        ("Is there text?", "nan"),  # bad rows contribute nothing
        ("Is there text?", "maybe"),
        ("Describe the image.", "a big polyp"),  # untemplated rows contribute nothing
    ]
    vocab = build_candidate_vocabulary(train)
    assert sorted(vocab) == list(range(1, 20))
    assert vocab[10] == [*kvasir_vqa.GRID_CELLS, "lower-rigth"]
    assert vocab[13] == [*kvasir_vqa.COLOR_LABELS, "teal"]
    assert vocab[9] == ["none", "<5mm", "5-10mm", "11-20mm", ">20mm", ">20"]  # single labels, no "5-10mm; <5mm"
    assert vocab[1] == ["yes", "no", "maybe"]
    assert "nan" not in vocab[1]
    assert vocab[2] == ["yes", "no", "not relevant"]  # documented vocabulary even without training rows
    assert all("; " not in label for labels in vocab.values() for label in labels)


def test_candidates_come_from_the_training_split_only():
    train = [(Q_COLOR, "pink"), (Q_EASY, "yes")]
    validation = [(Q_COLOR, "turquoise"), (Q_EASY, "unclear")]
    vocab = build_candidate_vocabulary(train)
    assert "turquoise" not in vocab[13] and "unclear" not in vocab[2]
    rows = [("train", q, a) for q, a in train] + [("val", q, a) for q, a in validation]
    rows += [("test", Q_COLOR, "mauve"), ("train", Q_COLOR, "amber")]
    split_vocab = build_candidate_vocabulary_for_split(rows)
    assert "amber" in split_vocab[13]
    assert not {"turquoise", "mauve"} & set(split_vocab[13]) and "unclear" not in split_vocab[2]


def test_candidates_for_untemplated_types():
    assert candidates_for(infer_question_type("Is the mucosa inflamed?"), {}) == ["yes", "no"]
    assert candidates_for(infer_question_type("What colour is the polyp?"), {}) == list(kvasir_vqa.COLOR_LABELS)
    assert candidates_for(infer_question_type("How big is the polyp?"), {}) == list(kvasir_vqa.SIZE_BINS)
    assert candidates_for(infer_question_type("How many ulcers?"), {}) == [str(n) for n in range(11)]
    assert candidates_for(infer_question_type("Describe the image."), {}) == []


def test_candidates_for_templates_use_the_vocabulary_given():
    vocab = build_candidate_vocabulary([(Q_EASY, "not relevant"), (Q_EASY, "perhaps")])
    assert candidates_for(infer_question_type(Q_EASY), vocab) == ["yes", "no", "not relevant", "perhaps"]
    assert candidates_for(infer_question_type(Q_EASY), {}) == ["yes", "no", "not relevant"]


def test_typed_record_fields():
    vocab = build_candidate_vocabulary([])
    fields = typed_record_fields(Q_INSTR_LOC, vocab)
    assert fields == {"question_type": MCQ, "template": 10, "multi_label": True, "candidates": list(kvasir_vqa.GRID_CELLS)}
    assert typed_record_fields("Describe the image.", vocab) == {
        "question_type": OPEN_ENDED, "template": None, "multi_label": False, "candidates": []}


# ------------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes", "yes"),
        ("  No.  ", "no"),
        ("red; pink", "pink; red"),
        ("Pink;Red", "pink; red"),
        ("red ;pink;; ", "pink; red"),
        ("capsule   endoscopy", "capsule endoscopy"),
        ("red; red", "red"),
        ("12.5 mm", "12.5 mm"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_split_labels_and_label_set():
    assert split_labels("center; upper-left;center-left") == ["center", "center-left", "upper-left"]
    assert split_labels(";; ;") == []
    assert label_set("pink; red") == label_set("Red;pink") == frozenset({"pink", "red"})


@pytest.mark.parametrize("answer", [None, "", "   ", "nan", "NaN", " NAN ", "null", float("nan")])
def test_bad_answers(answer):
    assert is_bad_answer(answer)


@pytest.mark.parametrize("answer", ["none", "None", "no", "0", "yes", "not relevant"])
def test_valid_answers_are_not_bad(answer):
    assert not is_bad_answer(answer)


INF = math.inf


@pytest.mark.parametrize(
    ("text", "interval"),
    [
        ("<5mm", SizeInterval(0, 5, True, False)),
        ("5-10mm", SizeInterval(5, 10, True, True)),
        ("11-20mm", SizeInterval(11, 20, True, True)),
        (">20mm", SizeInterval(20, INF, False, False)),
        (">20", SizeInterval(20, INF, False, False)),
        ("8 mm", SizeInterval(8, 8)),
        ("about 12mm", SizeInterval(12, 12)),
        ("12.5 mm", SizeInterval(12.5, 12.5)),
        ("1 cm", SizeInterval(10, 10)),
        ("1.5cm", SizeInterval(15, 15)),
        ("12", SizeInterval(12, 12)),
        ("between 5 and 10 mm", SizeInterval(5, 10)),
        ("less than 5 mm", SizeInterval(0, 5, True, False)),
        (" >20MM ", SizeInterval(20, INF, False, False)),
    ],
)
def test_parse_size_mm(text, interval):
    assert parse_size_mm(text) == interval


def test_parse_size_none_and_failures():
    assert parse_size_mm("none") is SIZE_NONE
    assert parse_size_mm("None") is SIZE_NONE
    for text in ["", "abc", "nan", "5-10mm;<5mm", None, "large"]:
        assert parse_size_mm(text) is None


def test_parse_size_labels():
    assert parse_size_labels("5-10mm;<5mm") == [SizeInterval(5, 10), SizeInterval(0, 5, True, False)]
    assert parse_size_labels("none") == [SIZE_NONE]
    assert parse_size_labels("5-10mm; large") is None
    assert parse_size_labels("") is None


def test_interval_distance_mm():
    small, mid, big, large = (parse_size_mm(t) for t in ("<5mm", "5-10mm", "11-20mm", ">20mm"))
    assert interval_distance_mm(small, mid) == 0  # touching bins
    assert interval_distance_mm(mid, big) == 1
    assert interval_distance_mm(big, small) == 6
    assert interval_distance_mm(large, parse_size_mm("8 mm")) == 12
    assert interval_distance_mm(parse_size_mm("7 mm"), mid) == 0
    assert interval_distance_mm(SIZE_NONE, SIZE_NONE) == 0
    assert interval_distance_mm(SIZE_NONE, small) == INF


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("3", 3), ("3 polyps", 3), ("there are 2", 2), (" 16 ", 16), ("two", 2), ("Twenty", 20),
        ("zero", 0), ("none", 0), ("no", 0), ("No polyps", 0), ("3.0", 3),
        ("2.5", None), ("", None), ("many", None), (None, None), ("12345678901", None),
    ],
)
def test_parse_count(text, count):
    assert parse_count(text) == count
