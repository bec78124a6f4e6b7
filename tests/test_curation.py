"""GAP-REPLAY curation, library level (no Beam): parsers and cleaners on the real sample, safe XML, dedup,
contamination. Expectations were checked by hand against the raw files in shared/data/gap_replay_sample."""

import io
import json
import os
import time
import zipfile

import pytest

from meditron_jax.data.curation import contamination, dedup, guidelines, jats, medline, replay, safe_xml
from meditron_jax.data.curation.records import Doc, Malformed

SAMPLE = "gap_replay_sample"


def _read(reader, path, **kw):
    with open(path, "rb") as fh:
        return list(reader(str(path), fh, **kw))


@pytest.fixture(scope="module")
def cdc_raw(shared_data):
    with zipfile.ZipFile(shared_data / SAMPLE / "guidelines_cdc" / "mmsu_art_en_txt_json.zip") as z:
        return json.loads(z.read("mmsu_art_en_txt.json"))


# ---------------------------------------------------------------- safe XML

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<article><body><p>&lol9;</p></body></article>
"""


def test_billion_laughs_rejected_at_first_declaration_without_expansion():
    start = time.perf_counter()
    with pytest.raises(safe_xml.UnsafeXMLError) as err:
        safe_xml.parse(BILLION_LAUGHS)
    # Rejected at line 3 (the first <!ENTITY>), long before &lol9; (10^9 "lol"s) could be expanded.
    assert err.value.line == 3 and time.perf_counter() - start < 1.0
    assert "entity declaration" in str(err.value)


def test_external_entity_is_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    xxe = f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]><a>&x;</a>'.encode()
    with pytest.raises(safe_xml.UnsafeXMLError) as err:
        safe_xml.parse(xxe)
    assert "TOP-SECRET" not in str(err.value)
    # External parameter entity (the DTD-fetching variant) is refused the same way.
    with pytest.raises(safe_xml.UnsafeXMLError):
        safe_xml.parse(b'<!DOCTYPE a [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]><a/>')


def test_doctype_with_external_dtd_is_allowed_but_not_fetched():
    # Every MEDLINE/JATS file names an external DTD; it is not read (no network), undeclared entities skipped.
    doc = b'<!DOCTYPE article PUBLIC "-//NLM//DTD JATS//EN" "http://127.0.0.1:9/x.dtd"><a>x &nbsp; y &amp; z</a>'
    root, skipped = safe_xml.parse(doc)
    assert safe_xml.text_of(root) == "x y & z" and skipped == 1
    with pytest.raises(safe_xml.XMLError) as err:  # without a DOCTYPE, an undefined entity is an error
        safe_xml.parse(b"<a>\n<b>&nbsp;</b></a>")
    assert err.value.line == 2


# ---------------------------------------------------------------- JATS papers


@pytest.fixture(scope="module")
def pone(shared_data):
    (doc,) = _read(jats.read_jats, shared_data / SAMPLE / "pmc_papers" / "pone.0046493.nxml")
    return doc


def test_jats_reference_list_removed_and_citations_become_markers(pone):
    text = pone.text
    assert pone.id == "pmc:PMC3460867" and pone.meta["pmid"] == "23029536"
    assert text.startswith("MmPPOX Inhibits Mycobacterium tuberculosis Lipolytic Enzymes")
    # Reference 4's full title (16 words) is gone; only its 12-word prefix survives inside the markers.
    full = (
        "Foamy macrophages from tuberculous patients' granulomas constitute a nutrient-rich reservoir "
        "for M. tuberculosis persistence"
    )
    assert full not in text
    assert (
        "[bib_ref] Foamy macrophages from tuberculous patients' granulomas constitute a nutrient-rich "
        "reservoir for M...., Peyron [/bib_ref]"
    ) in text
    # In-text citation [1] -> cited title + first author's surname.
    assert (
        "urgently needed [bib_ref] Drug-resistant tuberculosis: an insurmountable epidemic?, Chakroborty [/bib_ref]."
    ) in text
    # Reference-list-only strings (journal of ref 1, the list heading) and the citation brackets are gone.
    assert "Inflammopharmacology" not in text and "\n# References" not in text and "[1]" not in text
    assert pone.removed["reference_entries"] == 58
    assert "Enzymologie Interfaciale" not in text  # affiliations
    assert "http" not in text and "According to the World Health Organization (2011)," in text


def test_jats_figures_tables_and_captions_removed_fig_refs_marked(pone, shared_data):
    text = pone.text
    caption = "The proposed mechanism of action involves the opening of the cycle in each molecule"
    assert caption not in text
    assert "Substrate chain length/specific activities" not in text  # table 1 header cell
    assert "[fig_ref] Figure 1: Chemical structure of inhibitors [/fig_ref]" in text
    assert "[fig_ref] Table 1: Substrate specificity of recombinant Lip-HSL proteins [/fig_ref]" in text
    assert pone.removed["figures"] == 4 and pone.removed["tables"] == 3 and pone.removed["captions"] == 7
    assert "\n\n# Introduction\n" in text and "\n\n# Materials and Methods\n" in text
    # Option: MEDITRON's released behaviour keeps captions as [fig] ... [/fig].
    (kept,) = _read(jats.read_jats, shared_data / SAMPLE / "pmc_papers" / "pone.0046493.nxml", keep_captions=True)
    line = next(x for x in kept.text.split("\n") if x.startswith("[fig] Figure 1:"))
    assert caption in line and line.endswith("[/fig]")
    assert "[table] Table 1: Substrate specificity of recombinant Lip-HSL proteins. [/table]" in kept.text


def test_jats_unresolvable_citation_deleted(shared_data):
    (doc,) = _read(jats.read_jats, shared_data / SAMPLE / "pmc_papers" / "pntd.0002065.nxml")
    # Ref 1 (Murphy, "Veterinary Virology") is an unstructured <mixed-citation> without a title element.
    assert "genus Phlebovirus. The disease" in doc.text and "Murphy" not in doc.text
    assert doc.removed["citations_unresolved"] == 9


def test_jats_malformed_and_unsafe_reported_with_position(shared_data):
    raw = (shared_data / SAMPLE / "pmc_papers" / "pone.0000217.nxml").read_bytes()[:3000]
    (bad,) = list(jats.read_jats("cut.nxml", io.BytesIO(raw)))
    assert isinstance(bad, Malformed) and bad.error.startswith("malformed XML") and bad.position["line"] >= 1
    (unsafe,) = list(jats.read_jats("lol.nxml", io.BytesIO(BILLION_LAUGHS)))
    assert unsafe.error.startswith("unsafe XML") and unsafe.position["line"] == 3


# ---------------------------------------------------------------- MEDLINE abstracts


def test_medline_real_sample_counts_and_structured_labels(shared_data):
    out = _read(medline.read_medline, shared_data / SAMPLE / "pubmed_abstracts" / "medline16n0902.xml.gz")
    docs = [d for d in out if isinstance(d, Doc)]
    assert len(out) == len(docs) == 604  # SOURCES.md §7: 604 citations
    assert sum(1 for d in docs if d.text) == 526 and sum(d.meta.get("drop") == "no_abstract" for d in docs) == 78
    first = docs[0]
    assert first.id == "pubmed:17942999" and first.meta["pmcid"] == "PMC4380289"
    assert first.text.startswith(
        "Neuroplasticity in the processing of pitch dimensions: a multidimensional scaling analysis of the "
        "mismatch negativity.\nPURPOSE: An auditory electrophysiological study was conducted"
    )
    assert [ln.split(":")[0] for ln in first.text.split("\n")[1:]] == ["PURPOSE", "METHODS", "RESULTS", "CONCLUSIONS"]


def _citation(pmid, abstract="", title="A synthetic title."):
    body = f"<Abstract><AbstractText>{abstract}</AbstractText></Abstract>" if abstract else ""
    return (
        f'<MedlineCitation Status="MEDLINE">\n<PMID Version="1">{pmid}</PMID>\n<Article>\n'
        f"<ArticleTitle>{title}</ArticleTitle>\n{body}\n</Article>\n</MedlineCitation>\n"
    )


def test_medline_broken_record_counted_rest_survives():
    head = (
        '<?xml version="1.0"?>\n<!DOCTYPE MedlineCitationSet PUBLIC "-//NLM//DTD Medline//EN" '
        '"https://www.nlm.nih.gov/x.dtd">\n<MedlineCitationSet>\n'
    )
    broken = _citation(2, "An abstract whose element is never <b>closed.").replace("</b>", "")
    data = (
        head
        + _citation(1, "First abstract text.")
        + broken
        + _citation(3, "Third abstract text.")
        + "</MedlineCitationSet>\n"
    ).encode()
    out = list(medline.read_medline("m.xml", io.BytesIO(data)))
    assert [d.id for d in out if isinstance(d, Doc)] == ["pubmed:1", "pubmed:3"]
    (bad,) = [m for m in out if isinstance(m, Malformed)]
    offset = data.index(b"<MedlineCitation", data.index(b'<PMID Version="1">1<'))
    assert bad.position["record"] == 1 and bad.position["byte_offset"] == offset
    # The record starts on line 11; expat stops on its 5th line, where </AbstractText> meets the open <b>.
    assert bad.position["line"] == data[:offset].count(b"\n") + 1 == 11
    assert bad.position["error_line"] == 15
    assert "mismatched tag" in bad.error


def test_medline_entity_bomb_in_doctype_is_not_expanded():
    data = (
        b'<?xml version="1.0"?>\n<!DOCTYPE MedlineCitationSet [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n<MedlineCitationSet>\n'
        + _citation(1, "Uses &b; here.").encode()
        + _citation(2, "Clean abstract.").encode()
        + b"</MedlineCitationSet>\n"
    )
    out = list(medline.read_medline("bomb.xml", io.BytesIO(data)))
    errors = sorted(m.error for m in out if isinstance(m, Malformed))
    assert len(errors) == 2 and "undefined entity" in errors[0] and "unsafe XML" in errors[1]
    assert [d.id for d in out if isinstance(d, Doc)] == ["pubmed:2"]
    assert all("aaaa" not in d.text for d in out if isinstance(d, Doc))


# ---------------------------------------------------------------- guidelines


def test_cdc_guideline_boilerplate_and_references_removed(cdc_raw):
    raw = cdc_raw["https://www.cdc.gov/mmwr/preview/mmwrhtml/00001773.htm"]
    text, removed = guidelines.clean_guideline(raw, guidelines.CDC)
    assert "Persons using assistive technology" in raw and "Persons using assistive technology" not in text
    assert "Dempsey M. Decline in tuberculosis" in raw and "Dempsey M. Decline in tuberculosis" not in text
    assert "Disclaimer All MMWR HTML documents" not in text and "HOME | ABOUT MMWR" not in text
    # Hard-wrapped body text is unwrapped ("quantitate the\nextent" in the raw dump).
    assert "Mortality statistics are frequently used to quantitate the extent of public health problems" in text
    assert text.startswith("Premature Mortality in the United States")
    assert removed["reference_list"] > 3000 and removed["boilerplate_head"] > 0


def test_cdc_guideline_navigation_stripped_headings_kept(cdc_raw):
    raw = cdc_raw["https://www.cdc.gov/mmwr/volumes/73/su/su7304a11.htm"]
    text, removed = guidelines.clean_guideline(raw, guidelines.CDC)
    for junk in ("Skip directly to", "(View author affiliations)", "https://", "Snapchat", "Vulnerability Disclosure"):
        assert junk in raw and junk not in text, junk
    headings = [ln for ln in text.split("\n") if ln.startswith("#")]
    assert headings[:4] == ["# Introduction", "# Methods", "# Results", "# Discussion"]
    assert text.startswith("Physical Activity Behaviors and Negative Safety and Violence Experiences")


def test_generic_guideline_lists_headings_and_menus():
    raw = (
        "Home | About | Contact | Search\n## Overview\nThis guideline covers asthma in adults.\n"
        "• Use inhaled steroids daily.\n* Review technique at every visit [3].\nFacebook\nTwitter\nLinkedIn\n"
        "YouTube\n#### Dosing\nSee https://example.org/asthma for the table.\n12 14 16 18\nReferences\n1. Smith J."
    )
    text, removed = guidelines.clean_guideline(raw)
    assert text == (
        "# Overview\nThis guideline covers asthma in adults.\n- Use inhaled steroids daily.\n"
        "- Review technique at every visit.\n\n### Dosing\nSee for the table."
    )
    assert removed["navigation"] and removed["reference_list"] and removed["urls"] and removed["bracket_refs"]


def test_guideline_jsonl_malformed_lines_reported_rest_kept():
    lines = [
        json.dumps({"id": "a", "text": "First guideline text about hypertension management in adults."}),
        '{"id": "b", "text": "unterminated',
        json.dumps({"id": "c", "title": "no text here"}),
        json.dumps({"id": "d", "content": {"Scope": "Second guideline on diabetes screening in adults."}}),
    ]
    data = ("\n".join(lines) + "\n").encode()
    out = list(guidelines.read_guidelines("guidelines_who/dump.jsonl", io.BytesIO(data)))
    assert [d.id for d in out if isinstance(d, Doc)] == ["guidelines:generic:a", "guidelines:generic:d"]
    bad = [m for m in out if isinstance(m, Malformed)]
    assert [m.position["line"] for m in bad] == [2, 3]
    assert bad[0].position["byte_offset"] == len(lines[0]) + 1 and "invalid JSON" in bad[0].error
    assert "no text field" in bad[1].error


# ---------------------------------------------------------------- replay


def test_wikitext_split_into_articles_and_detokenized(shared_data):
    docs = _read(replay.read_replay, shared_data / SAMPLE / "replay_general" / "valid.txt")
    assert len(docs) == 60  # 60 " = Title = " lines
    assert docs[0].text.startswith("Homarus gammarus\nHomarus gammarus, known as the European lobster")
    assert "weigh 0.7 – 2.2 kg (1.5 – 4.9 lb)." in docs[0].text and "\n\n## Description\n" in docs[0].text


# ---------------------------------------------------------------- dedup and contamination


def test_minhash_separates_near_duplicates_from_distinct_documents(cdc_raw):
    texts = [guidelines.clean_guideline(v, guidelines.CDC)[0] for v in list(cdc_raw.values())[:6]]
    words = texts[2].split()
    edited = " ".join("altered" if i % 97 == 0 else w for i, w in enumerate(words))  # ~1% of words changed
    h = dedup.MinHasher()
    sig = [h.signature(t) for t in texts]
    assert dedup.estimated_jaccard(sig[2], h.signature(edited)) >= 0.8
    assert max(dedup.estimated_jaccard(sig[i], sig[j]) for i in range(6) for j in range(i)) < 0.2
    assert dedup.exact_key(texts[2]) == dedup.exact_key(texts[2].upper().replace(" ", "  "))
    pairs = dedup.near_duplicate_pairs(
        [("b", h.signature(edited)), ("a", sig[2]), ("c", sig[3])], dedup.MinHashConfig()
    )
    assert [(p[0], p[1]) for p in pairs] == [("b", "a")]


def test_contamination_index_core_on_reference_strings():
    q = (
        "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm for two "
        "hours and diaphoresis; which enzyme rises first"
    )
    refs = [
        ("medqa/test:1", q),
        ("mmlu/test:7", "Which bone is the longest in the human body today?"),
        ("x/test:2", "Too short a question."),
    ]
    idx = contamination.ContaminationIndex.build(refs)
    assert idx.stats["too_short_to_check"] == 1 and idx.stats["checked_references"] == 2
    doc = "Review notes. " + q.upper() + " Answer: troponin rises later than myoglobin."
    assert idx.is_contaminated(doc) == (True, ["medqa/test:1"])
    assert idx.is_contaminated("It asks which bone is the longest in the human body today, correct?")[1] == [
        "mmlu/test:7"
    ]  # shorter than 13 words: matched whole
    assert idx.is_contaminated("A 45-year-old man presents with chest pain and dyspnea after a long flight.") == (
        False,
        [],
    )


def test_contamination_ignores_ngrams_shared_by_many_references():
    stem = "which of the following is the most appropriate next step in the management of this patient"
    refs = [(f"b/test:{i}", f"Case {i} word{i} alpha{i}. {stem}") for i in range(12)]
    idx = contamination.ContaminationIndex.build(refs, max_ref_df=10)
    assert idx.stats["common_ngrams_ignored"] > 0
    assert not idx.is_contaminated(f"Exam tip: {stem}?")[0]


def test_benchmark_adapter_reads_test_sets(shared_data):
    refs = contamination.benchmark_references(["medqa_4opt/test", "pubmedqa/test"])
    labels = {lb.split(":")[0] for lb, _ in refs}
    assert labels == {"medqa_4opt/test", "pubmedqa/test"} and len(refs) == 1273 + 500
    pqa = next(t for lb, t in refs if lb.startswith("pubmedqa/"))
    assert len(pqa.split()) > 100  # question + contexts + long answer


def test_input_patterns_follow_symlinked_folders(tmp_path):
    # Beam's local matcher found nothing under a symlinked folder, so a whole source was skipped silently.
    from meditron_jax.data.curation.pipeline import match_input

    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "b.jsonl").write_text("{}\n")
    (real / "a.jsonl").write_text("{}\n")
    (real / "notes.txt").write_text("x")
    inp = tmp_path / "input"
    inp.mkdir()
    (inp / "guidelines_cdc").symlink_to(real, target_is_directory=True)
    found = match_input(str(inp), "guidelines*/*.jsonl")
    assert [os.path.basename(p) for p in found] == ["a.jsonl", "b.jsonl"]
    assert match_input(str(inp), str(real / "*.txt")) == [str(real / "notes.txt")]
