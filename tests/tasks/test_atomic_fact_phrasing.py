"""Atomic-fact recall against the way endoscopy reports are written.

Each case is a generated sentence, the x1 reference it is scored against, the reference's atomic items and the
facts a clinician would credit the sentence with: colour words beyond the vocabulary's labels, instruments,
procedures, findings and landmarks as endoscopists name them, locations relative to the image, and negated, hedged
or historical statements, which are not present findings.
"""

import json

import pytest

from surgvqa.tasks.kvasir_vqa_x1.atomic_facts import check_facts, facts_of

Q_COLOUR = "What color is the abnormality? If more than one separate with ;"
Q_LANDMARK_COLOUR = "What color is the anatomical landmark? If more than one separate with ;"
Q_INSTRUMENTS = "Are there any instruments in the image? Check all that are present."
Q_N_INSTRUMENTS = "How many instrumnets are in the image?"
Q_PROCEDURE = "What type of procedure is the image taken from?"
Q_ABNORMALITIES = "Are there any abnormalities in the image? Check all that are present."
Q_LANDMARKS = "Are there any anatomical landmarks in the image? Check all that are present."
Q_POLYP_TYPE = "What type of polyp is present?"
Q_WHERE = "Where in the image is the abnormality?"
Q_INSTRUMENT_WHERE = "Where in the image is the instrument?"
Q_LANDMARK_WHERE = "Where in the image is the anatomical landmark?"
Q_POLYPS = "How many polyps are in the image?"
Q_FINDING = "Does this image contain any finding?"
Q_REMOVED = "Have all polyps been removed?"
Q_SIZE = "What is the size of the polyp?"
Q_EASY = "Is this finding easy to detect?"


def case(prediction, reference, items, credited, *, name):
    return pytest.param(prediction, reference, items, set(credited), id=name)


CASES = [
    # ------------------------------------------------------------------ colours beyond the vocabulary's labels
    case("The polyp is reddish with a whitish cap.", "The polyp is red and white.",
         [(Q_COLOUR, "red; white")], {"red", "white"}, name="colour-ish-forms"),
    case("Erythematous, friable mucosa throughout the field.", "The abnormal mucosa is red.",
         [(Q_COLOUR, "red")], {"red"}, name="colour-erythematous-is-red"),
    case("Patchy erythema of the rectal mucosa.", "The affected mucosa appears red.",
         [(Q_COLOUR, "red")], {"red"}, name="colour-erythema-is-red"),
    case("Hyperaemic mucosa at the gastro-oesophageal junction.", "The landmark appears red.",
         [(Q_LANDMARK_COLOUR, "red")], {"red"}, name="colour-hyperaemic-is-red"),
    case("The lesion has a pinkish hue.", "The abnormality is pink.",
         [(Q_COLOUR, "pink")], {"pink"}, name="colour-pinkish"),
    case("Inflamed, bleeding mucosa is seen.", "The abnormality is red.",
         [(Q_COLOUR, "red")], set(), name="colour-inflamed-or-bleeding-is-no-colour"),
    case("The mucosa looks pale.", "The abnormal area is white.",
         [(Q_COLOUR, "white")], set(), name="colour-pale-is-not-white"),
    case("Dark mucosa in the caecum.", "The abnormality is black.",
         [(Q_COLOUR, "black")], set(), name="colour-dark-is-not-black"),
    case("Non-erythematous mucosa with a yellowish patch.", "The area is red and yellow.",
         [(Q_COLOUR, "red; yellow")], {"yellow"}, name="colour-non-erythematous-negates-red"),
    case("Under white-light imaging the polyp looks pink.", "The polyp is pink with white spots.",
         [(Q_COLOUR, "pink; white")], {"pink"}, name="colour-white-light-is-imaging"),
    case("A green box artefact is present; the lesion is red.", "The lesion is red with a green tinge.",
         [(Q_COLOUR, "red; green")], {"red"}, name="colour-green-box-is-the-artefact"),
    case("The polyp is flesh-coloured.", "The polyp is flesh coloured.",
         [(Q_COLOUR, "flesh")], {"flesh"}, name="colour-flesh-coloured"),
    case("The polyp is isochromatic with the surrounding mucosa.", "The polyp is flesh coloured.",
         [(Q_COLOUR, "flesh")], {"flesh"}, name="colour-isochromatic-is-flesh"),
    case("A salmon-coloured tongue of mucosa extends upwards.", "The landmark is pink.",
         [(Q_LANDMARK_COLOUR, "pink")], set(), name="colour-salmon-alone-is-not-pink"),
    case("The polyp is pink, not red.", "The polyp is red.",
         [(Q_COLOUR, "red")], set(), name="colour-negated"),
    case("Possibly erythematous mucosa.", "The mucosa is red.",
         [(Q_COLOUR, "red")], set(), name="colour-hedged"),
    case("The landmark appears greyish-white.", "The landmark is grey and white.",
         [(Q_LANDMARK_COLOUR, "grey; white")], {"grey", "white"}, name="colour-compound"),
    case("A purplish, violaceous bulge.", "The abnormality is purple.",
         [(Q_COLOUR, "purple")], {"purple"}, name="colour-violaceous-is-purple"),
    # ------------------------------------------------------------------ instruments as endoscopists name them
    case("A snare is closed around the stalk.", "A polyp snare can be seen.",
         [(Q_INSTRUMENTS, "polyp snare")], {"polyp snare"}, name="instrument-snare"),
    case("Cold forceps are visible.", "Biopsy forceps are visible.",
         [(Q_INSTRUMENTS, "biopsy forceps")], {"biopsy forceps"}, name="instrument-cold-forceps"),
    case("Two hemoclips have been placed on the defect.", "Metal clips are visible.",
         [(Q_INSTRUMENTS, "metal clip")], {"metal clip"}, name="instrument-hemoclip"),
    case("An endoclip closes the mucosal defect.", "A metal clip can be seen.",
         [(Q_INSTRUMENTS, "metal clip")], {"metal clip"}, name="instrument-endoclip"),
    case("A sclerotherapy needle is inserted into the lesion.", "An injection needle can be seen.",
         [(Q_INSTRUMENTS, "injection needle")], {"injection needle"}, name="instrument-sclerotherapy-needle"),
    case("A spray catheter is in view.", "A tube is visible.",
         [(Q_INSTRUMENTS, "tube")], {"tube"}, name="instrument-catheter-is-a-tube"),
    case("The colonoscope is retroflexed; no accessory is in view.", "No instruments are present.",
         [(Q_INSTRUMENTS, "none")], {"none"}, name="instrument-no-accessory"),
    case("The colonoscope is seen in retroflexion.", "A tube can be seen.",
         [(Q_INSTRUMENTS, "tube")], set(), name="instrument-the-scope-is-not-one"),
    case("Biopsy forceps are visible; no snare is seen.", "Biopsy forceps and a polyp snare are visible.",
         [(Q_INSTRUMENTS, "biopsy forceps; polyp snare")], {"biopsy forceps"}, name="instrument-one-negated"),
    case("A clip placed previously is still in view.", "A metal clip is visible.",
         [(Q_INSTRUMENTS, "metal clip")], {"metal clip"}, name="instrument-history-still-in-view"),
    case("A needle-knife is in view.", "An injection needle can be seen.",
         [(Q_INSTRUMENTS, "injection needle")], set(), name="instrument-needle-knife-cuts"),
    case("Grasping forceps hold the retrieved polyp.", "Biopsy forceps are visible.",
         [(Q_INSTRUMENTS, "biopsy forceps")], set(), name="instrument-grasping-forceps-take-no-biopsy"),
    case("Two instruments, a snare and forceps, are visible.", "Two instruments are visible.",
         [(Q_N_INSTRUMENTS, "2")], {"2"}, name="instrument-count"),
    # ------------------------------------------------------------------ procedures
    case("EGD image showing the pylorus.", "The image was taken during a gastroscopy.",
         [(Q_PROCEDURE, "gastroscopy")], {"gastroscopy"}, name="procedure-egd"),
    case("OGD, antral view.", "The image was taken during a gastroscopy.",
         [(Q_PROCEDURE, "gastroscopy")], {"gastroscopy"}, name="procedure-ogd"),
    case("Upper GI endoscopy view of the antrum.", "The image was taken during a gastroscopy.",
         [(Q_PROCEDURE, "gastroscopy")], {"gastroscopy"}, name="procedure-upper-gi-endoscopy"),
    case("The image was taken with a colonoscope.", "This is a colonoscopy image.",
         [(Q_PROCEDURE, "colonoscopy")], {"colonoscopy"}, name="procedure-colonoscope"),
    case("Flexible sigmoidoscopy image.", "This is a colonoscopy image.",
         [(Q_PROCEDURE, "colonoscopy")], set(), name="procedure-sigmoidoscopy-is-another"),
    case("Wireless capsule endoscopy frame.", "The image comes from capsule endoscopy.",
         [(Q_PROCEDURE, "capsule endoscopy")], {"capsule endoscopy"}, name="procedure-capsule"),
    case("Image from a gastroscopy.", "The image was taken during a colonoscopy.",
         [(Q_PROCEDURE, "colonoscopy")], set(), name="procedure-wrong"),
    # ------------------------------------------------------------------ findings
    case("A sessile adenoma is seen.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], {"polyp"}, name="finding-adenoma-is-a-polyp"),
    case("Inflammatory pseudopolyps in a colitic colon.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="finding-pseudopolyp-is-not-a-polyp"),
    case("Ulcerative colitis, Mayo 2.", "The image shows ulcerative colitis.",
         [(Q_ABNORMALITIES, "ulcerative colitis")], {"ulcerative colitis"}, name="finding-uc-with-mayo"),
    case("Active UC with loss of vascular pattern.", "The image shows ulcerative colitis.",
         [(Q_ABNORMALITIES, "ulcerative colitis")], {"ulcerative colitis"}, name="finding-uc-abbreviated"),
    case("Colitis with erosions.", "The image shows ulcerative colitis.",
         [(Q_ABNORMALITIES, "ulcerative colitis")], set(), name="finding-colitis-alone-is-not-uc"),
    case("LA grade B changes above the Z-line.", "Oesophagitis is present.",
         [(Q_ABNORMALITIES, "oesophagitis")], {"oesophagitis"}, name="finding-la-grade"),
    case("Reflux esophagitis.", "Oesophagitis is present.",
         [(Q_ABNORMALITIES, "oesophagitis")], {"oesophagitis"}, name="finding-american-spelling"),
    case("SSBE at the gastro-oesophageal junction.", "Short-segment Barrett's is visible.",
         [(Q_ABNORMALITIES, "short-segment barretts")], {"short-segment barretts"}, name="finding-ssbe"),
    case("Long-segment Barrett's oesophagus.", "Barrett's oesophagus is present.",
         [(Q_ABNORMALITIES, "barretts")], {"barretts"}, name="finding-long-segment-barretts"),
    case("Internal haemorrhoids on retroflexion.", "Hemorrhoids are present.",
         [(Q_ABNORMALITIES, "hemorrhoids")], {"hemorrhoids"}, name="finding-haemorrhoids"),
    case("A polyp without surface ulceration is seen.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], {"polyp"}, name="finding-without-after-does-not-negate"),
    case("No polyp is seen, but ulcerative colitis is present.", "The image shows ulcerative colitis.",
         [(Q_ABNORMALITIES, "ulcerative colitis")], {"ulcerative colitis"}, name="finding-negation-ends-at-clause"),
    case("Likely a hyperplastic polyp.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], {"polyp"}, name="finding-likely-is-committed"),
    case("Findings are suggestive of oesophagitis.", "Oesophagitis is present.",
         [(Q_ABNORMALITIES, "oesophagitis")], {"oesophagitis"}, name="finding-suggestive-of"),
    # ------------------------------------------------------------------ hedged and historical: not present findings
    case("A polyp cannot be excluded.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="hedge-cannot-be-excluded"),
    case("A small polyp cannot be excluded.", "No polyps are visible.",
         [(Q_POLYPS, "0")], set(), name="hedge-cannot-be-excluded-is-not-absence"),
    case("An abnormality cannot be ruled out.", "The image shows no finding.",
         [(Q_FINDING, "no")], set(), name="hedge-cannot-be-ruled-out"),
    case("Possible oesophagitis.", "Oesophagitis is present.",
         [(Q_ABNORMALITIES, "oesophagitis")], set(), name="hedge-possible"),
    case("There may be a small polyp.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="hedge-may"),
    case("Polyp versus prominent fold.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="hedge-differential"),
    case("A possible lesion is seen.", "The image contains a finding.",
         [(Q_FINDING, "yes")], set(), name="hedge-possible-finding"),
    case("Possibly two polyps.", "Two polyps are visible.",
         [(Q_POLYPS, "2")], set(), name="hedge-count"),
    case("Status post polypectomy, with a scar.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="history-status-post-polypectomy"),
    case("S/p polypectomy of a sessile polyp.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="history-s-p"),
    case("The polyps were removed previously.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], set(), name="history-removed-previously"),
    case("Two polyps were removed.", "Two polyps are visible.",
         [(Q_POLYPS, "2")], set(), name="history-count"),
    case("History of ulcerative colitis; quiescent today.", "The image shows ulcerative colitis.",
         [(Q_ABNORMALITIES, "ulcerative colitis")], set(), name="history-of"),
    case("A previously resected 15 mm polyp.", "The polyp measures between 11 and 20 mm.",
         [(Q_SIZE, "11-20mm")], set(), name="history-size"),
    case("Possible oesophagitis; a polyp is seen.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], {"polyp"}, name="hedge-ends-at-clause"),
    case("A polyp is seen; a second one was removed previously.", "A polyp is present.",
         [(Q_ABNORMALITIES, "polyp")], {"polyp"}, name="history-of-another-polyp"),
    case("There is no evidence of ulcerative colitis.", "No abnormality is seen.",
         [(Q_ABNORMALITIES, "none")], set(), name="negation-of-one-finding-is-not-none"),
    case("No evidence of any abnormality.", "No abnormality is seen.",
         [(Q_ABNORMALITIES, "none")], {"none"}, name="negation-no-evidence-of"),
    case("No more than two polyps.", "No polyps are visible.",
         [(Q_POLYPS, "0")], set(), name="negation-no-more-than-is-not-zero"),
    case("The polyp is not larger than 20 mm.", "The polyp is larger than 20 mm.",
         [(Q_SIZE, ">20mm")], set(), name="negation-size"),
    # ------------------------------------------------------------------ removal
    case("No polyps remain after polypectomy.", "No polyps are visible; all polyps have been removed.",
         [(Q_POLYPS, "0"), (Q_REMOVED, "yes")], {"0", "yes"}, name="removal-none-remain"),
    case("Residual polyp tissue remains at the margin.", "Not all polyps were removed.",
         [(Q_REMOVED, "no")], {"no"}, name="removal-residual"),
    case("No residual polyp after EMR.", "All polyps have been removed.",
         [(Q_REMOVED, "yes")], {"yes"}, name="removal-no-residual"),
    case("No residual polyp after EMR.", "No, polyp tissue remains.",
         [(Q_REMOVED, "no")], set(), name="removal-leading-no-is-a-negator"),
    case("The polyp was possibly removed.", "All polyps have been removed.",
         [(Q_REMOVED, "yes")], set(), name="removal-hedged"),
    # ------------------------------------------------------------------ landmarks
    case("The squamocolumnar junction is regular.", "The Z-line is visible.",
         [(Q_LANDMARKS, "z-line")], {"z-line"}, name="landmark-squamocolumnar-junction"),
    case("The gastro-oesophageal junction is seen.", "The Z-line is visible.",
         [(Q_LANDMARKS, "z-line")], set(), name="landmark-goj-is-not-the-z-line"),
    case("The appendiceal orifice is seen.", "The cecum is visible.",
         [(Q_LANDMARKS, "cecum")], {"cecum"}, name="landmark-appendiceal-orifice"),
    case("Ileocaecal valve at the caecal pole.", "The cecum is visible.",
         [(Q_LANDMARKS, "cecum")], {"cecum"}, name="landmark-caecal"),
    case("The ileocaecal valve is seen.", "The ileum is visible.",
         [(Q_LANDMARKS, "ileum")], set(), name="landmark-valve-is-not-the-ileum"),
    case("Terminal ileum intubated; ileal mucosa normal.", "The ileum is visible.",
         [(Q_LANDMARKS, "ileum")], {"ileum"}, name="landmark-terminal-ileum"),
    case("The pyloric channel is open.", "The pylorus is visible.",
         [(Q_LANDMARKS, "pylorus")], {"pylorus"}, name="landmark-pyloric"),
    # ------------------------------------------------------------------ Paris classification
    case("A pedunculated polyp on a long stalk.", "The polyp is Paris Ip.",
         [(Q_POLYP_TYPE, "paris ip")], {"paris ip"}, name="paris-pedunculated"),
    case("A broad-based sessile polyp.", "The polyp is Paris Is.",
         [(Q_POLYP_TYPE, "paris is")], {"paris is"}, name="paris-sessile"),
    case("A semi-pedunculated polyp.", "The polyp is Paris Ip.",
         [(Q_POLYP_TYPE, "paris ip")], set(), name="paris-semipedunculated-is-isp"),
    case("A sessile serrated lesion.", "The polyp is Paris Is.",
         [(Q_POLYP_TYPE, "paris is")], set(), name="paris-sessile-serrated-is-histology"),
    case("A slightly elevated 0-IIa lesion.", "The polyp is Paris IIa.",
         [(Q_POLYP_TYPE, "paris iia")], {"paris iia"}, name="paris-0-iia"),
    case("Paris 0-Is polyp.", "The polyp is Paris Is.",
         [(Q_POLYP_TYPE, "paris is")], {"paris is"}, name="paris-0-is"),
    # ------------------------------------------------------------------ locations relative to the image
    case("The polyp lies just left of centre.", "The abnormality lies in the center-left area.",
         [(Q_WHERE, "center-left")], {"center-left"}, name="where-left-of-centre"),
    case("Slightly right of the center.", "The abnormality lies in the center-right area.",
         [(Q_WHERE, "center-right")], {"center-right"}, name="where-right-of-the-center"),
    case("In the lower left of the image.", "The abnormality is in the lower-left.",
         [(Q_WHERE, "lower-left")], {"lower-left"}, name="where-lower-left"),
    case("Upper-right quadrant.", "The abnormality is in the upper-right.",
         [(Q_WHERE, "upper-right")], {"upper-right"}, name="where-quadrant"),
    case("Located centrally.", "The abnormality is in the center.",
         [(Q_WHERE, "center")], {"center"}, name="where-centrally"),
    case("On the left side of the image.", "The abnormality lies in the center-left area.",
         [(Q_WHERE, "center-left")], {"center-left"}, name="where-left-side"),
    case("The snare enters from the bottom right corner.", "The instrument is in the lower-right.",
         [(Q_INSTRUMENT_WHERE, "lower-right")], {"lower-right"}, name="where-bottom-right-corner"),
    case("At the top of the image.", "The landmark is in the upper-center.",
         [(Q_LANDMARK_WHERE, "upper-center")], {"upper-center"}, name="where-at-the-top"),
    case("Left upper quadrant and centre-right.", "It lies in the upper-left and center-right.",
         [(Q_WHERE, "upper-left; center-right")], {"upper-left", "center-right"}, name="where-two-cells"),
    case("A polyp in the left colon.", "The abnormality lies in the center-left area.",
         [(Q_WHERE, "center-left")], set(), name="where-left-colon-is-anatomy"),
    case("Upper GI endoscopy image.", "The abnormality is in the upper-center.",
         [(Q_WHERE, "upper-center")], set(), name="where-upper-gi-is-anatomy"),
    case("In the lower part of the oesophagus.", "The abnormality is in the lower-center.",
         [(Q_WHERE, "lower-center")], set(), name="where-lower-oesophagus-is-anatomy"),
    case("Not in the centre but at the upper left.", "It lies at the upper left and in the centre.",
         [(Q_WHERE, "upper-left; center")], {"upper-left"}, name="where-negated-cell"),
    case("On the left.", "The abnormality is in the upper left.",
         [(Q_WHERE, "upper-left")], set(), name="where-side-is-vaguer-than-corner"),
    # ------------------------------------------------------------------ counts, sizes, yes/no
    case("A single sessile polyp.", "One polyp is visible.",
         [(Q_POLYPS, "1")], {"1"}, name="count-single"),
    case("Zero polyps are visible.", "No polyps are visible.",
         [(Q_POLYPS, "0")], {"0"}, name="count-zero"),
    case("About 1.5 cm across.", "The polyp measures between 11 and 20 mm.",
         [(Q_SIZE, "11-20mm")], {"11-20mm"}, name="size-in-centimetres"),
    case("The polyp is easy to miss.", "The finding is not easy to detect.",
         [(Q_EASY, "no")], {"no"}, name="easy-to-miss"),
]


@pytest.mark.parametrize(("prediction", "reference", "items", "credited"), CASES)
def test_a_prediction_is_credited_with_what_a_clinician_would_credit(prediction, reference, items, credited):
    facts = facts_of(json.dumps([{"q": question, "a": answer} for question, answer in items]))
    labels = [fact.label for fact in facts]
    assert len(set(labels)) == len(labels) and credited <= set(labels)
    # the reference states each of its own facts: the cases compare a prediction with a full answer
    assert all(check_facts(reference, facts)), (reference, labels)
    stated = {fact.label for fact, ok in zip(facts, check_facts(prediction, facts)) if ok}
    assert stated == credited


def test_there_are_sixty_or_more_hand_written_cases():
    assert len(CASES) >= 60
