"""The challenges' text metrics: METEOR by NLTK with WordNet 3.0 (hand-computed cases), and the whole set equal to
the organizers' definitions computed here directly with nltk, rouge_score and sacrebleu."""

import gzip

import pytest

from surgvqa.evaluation.nltk_data import LEXNAMES_MAN_PAGE, NltkDataMissing, ensure_nltk_data, lexnames_table
from surgvqa.evaluation.text_metrics import MeteorRun, challenge_meteor, text_metrics


def meteor(hypothesis: str, reference: str) -> float:
    return challenge_meteor([hypothesis], [reference])


# score = F_mean * (1 - 0.5 * (chunks / matches)^3), F_mean = P R / (0.9 P + 0.1 R)


def test_one_word_exact_answer_scores_one_half():
    assert meteor("red", "red") == pytest.approx(0.5)  # one chunk of one match: penalty 0.5 * 1^3


def test_recall_weighs_nine_times_precision():
    # P = 1, R = 1/2: F_mean = 0.5 / (0.9 + 0.05); one chunk, one match: penalty 0.5
    assert meteor("red", "red pink") == pytest.approx(0.5 / 0.95 * 0.5)


def test_a_wordnet_synonym_matches():
    # "red" ~ "crimson" (one WordNet 3.0 synset): three matches in one chunk: 1 - 0.5 (1/3)^3
    assert meteor("a red polyp", "a crimson polyp") == pytest.approx(1 - 0.5 / 27)
    assert meteor("red", "crimson") == pytest.approx(0.5)
    # without a synonym: 2 of 3 words match in two chunks: F_mean = 2/3, penalty 0.5
    assert meteor("a green polyp", "a crimson polyp") == pytest.approx(2 / 3 * 0.5)
    # NLTK looks synonyms up after its stemming stage has replaced unmatched words by their Porter stems, so a
    # reference word whose stem differs ("large" -> "larg") is not found among the synonyms of "big"; the
    # organizers' scores, computed by the same code, agree.
    assert meteor("a big polyp", "a large polyp") == pytest.approx(2 / 3 * 0.5)


def test_porter_stems_match():
    # removed/remove and polyps/polyp share their stems: two matches in one chunk: 1 - 0.5 (1/2)^3
    assert meteor("removed polyps", "remove polyp") == pytest.approx(1 - 0.5 / 8)


def test_word_order_costs_through_fragmentation():
    assert meteor("pink red", "pink red") == pytest.approx(1 - 0.5 / 8)  # one chunk
    assert meteor("red pink", "pink red") == pytest.approx(0.5)  # two chunks of one word
    # a multi-label set in another order: pink, ";" and red all match, each its own chunk (3 of 3): penalty 0.5
    assert meteor("pink; red", "red; pink") == pytest.approx(0.5)


def test_text_metrics_equal_the_organizers_definitions_computed_directly():
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    hypotheses = ["the polyp is red", "red", "a big polyp in the upper-left", "no", "5-10mm", "pink; red",
                  "there are two polyps", "the polyp is red"]
    references = ["the polyp is red today", "red", "a large polyp upper-left", "yes", "<5mm", "red; pink",
                  "two polyps are visible", "the polyp is red today"]
    got = text_metrics(hypotheses, references, meteor=True)

    ensure_nltk_data()
    n = len(hypotheses)
    expected_meteor = sum(meteor_score([word_tokenize(r)], word_tokenize(h), alpha=0.9, beta=3, gamma=0.5)
                          for h, r in zip(hypotheses, references)) / n
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    assert got["bleu"] == pytest.approx(BLEU(smooth_method="none").corpus_score(hypotheses, [references]).score / 100)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(sum(s[key].fmeasure for s in rouge) / n)
    assert got["meteor"] == pytest.approx(expected_meteor)
    assert 0 < got["meteor"] < 1 and got["bleu"] > 0
    assert "meteor_1_5" in got  # the METEOR 1.5 jar's value (or why it could not run) stays beside it


def test_the_nltk_data_is_wordnet_3_0_with_the_lexnames_table():
    from nltk.corpus import wordnet

    ensure_nltk_data()
    assert wordnet.get_version() == "3.0"
    lines = lexnames_table().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[18] == "18\tnoun.person\t1" and lines[44] == "44\tadj.ppl\t3"
    assert gzip.decompress(LEXNAMES_MAN_PAGE.read_bytes())  # read from the installed manual page


def test_missing_wordnet_is_one_line_naming_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGVQA_NLTK_DATA", str(tmp_path / "nltk_data"))
    monkeypatch.setenv("SURGVQA_WORDNET_DIR", str(tmp_path / "no-wordnet"))
    with pytest.raises(NltkDataMissing) as caught:
        ensure_nltk_data()
    message = str(caught.value)
    assert "\n" not in message and "scripts/ensure-wordnet.sh" in message and "no-wordnet" in message


def test_the_data_folder_is_built_whole_from_the_installed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGVQA_NLTK_DATA", str(tmp_path / "nltk_data"))
    root = ensure_nltk_data()
    wordnet = root / "corpora" / "wordnet"
    assert not (wordnet / "data.noun").is_symlink() and (wordnet / "data.noun").stat().st_size > 10_000_000
    punkt = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in punkt.iterdir()) == ["abbrev_types.txt", "collocations.tab",
                                                       "ortho_context.tab", "sent_starters.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["nltk_data"]  # no staging folder left behind


def test_without_wordnet_meteor_is_reported_unavailable_and_the_other_metrics_still_count(tmp_path, monkeypatch):
    # A cluster node without root cannot install Debian's WordNet: evaluate must still give BLEU and ROUGE.
    monkeypatch.setenv("SURGVQA_NLTK_DATA", str(tmp_path / "nltk_data"))
    monkeypatch.setenv("SURGVQA_WORDNET_DIR", str(tmp_path / "no-wordnet"))
    scores = text_metrics(["a red polyp", "no"], ["a red polyp", "yes"], meteor=True,
                          meteor_run=MeteorRun([], []))
    assert "scripts/ensure-wordnet.sh" in scores["meteor"]["unavailable"]
    assert scores["rouge1"] == pytest.approx(0.5) and scores["rougeL"] == pytest.approx(0.5)
