"""The paper map: book/papers.yml (static fields) is valid, statuses come from the chapters' claim records, and
book/paper_map.md is exactly the render of both (so it cannot drift)."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from dmlab import papermap

ROOT = Path(papermap.__file__).resolve().parent.parent
PAPERS, BIB, TOC, MAP = (ROOT / p for p in ("book/papers.yml", "book/references.bib", "_toc.yml", "book/paper_map.md"))


@pytest.fixture(scope="module")
def papers():
    return papermap.load_papers(PAPERS)


SCRATCH = "15_feature_caching"


@pytest.fixture
def book(tmp_path):
    """A scratch copy of the bib and the toc; ``book(papers, ...)`` validates against it."""
    (tmp_path / "references.bib").write_text(BIB.read_text(encoding="utf-8"), encoding="utf-8")
    # the repository's toc and chapters, minus the chapter the tests below use as "not yet written"
    toc = yaml.safe_load(TOC.read_text(encoding="utf-8"))
    for part in toc.get("parts", []):
        part["chapters"] = [c for c in part["chapters"] if c.get("file") != f"notebooks/{SCRATCH}"]
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    (tmp_path / "notebooks").mkdir()
    for nb in (TOC.parent / "notebooks").glob("*.ipynb"):
        if nb.stem != SCRATCH:
            (tmp_path / "notebooks" / nb.name).write_text("{}", encoding="utf-8")

    def run(papers):
        papermap.validate(papers, bib_path=tmp_path / "references.bib", toc_path=tmp_path / "_toc.yml", records=[])

    run.root = tmp_path
    return run


def _add_to_toc(toc_path: Path, stem: str):
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    toc["parts"].insert(-1, {"caption": "V Accelerators", "chapters": [{"file": f"notebooks/{stem}"}]})
    toc_path.write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")


def test_committed_map_is_the_render(papers):
    rendered = papermap.render_paper_map(papers, toc_path=TOC)
    assert MAP.read_text(encoding="utf-8") == rendered, "book/paper_map.md is stale: run `python -m dmlab.papermap`"


def test_repository_papers_validate(papers):
    papermap.validate(papers, bib_path=BIB, toc_path=TOC)


def test_every_paper_is_cited_once_on_the_map(papers):
    text = MAP.read_text(encoding="utf-8")
    cited = re.findall(r"\{cite:[pt]\}`([^`]+)`", text)
    assert sorted(cited) == sorted(p["key"] for p in papers)
    assert len(set(cited)) == papermap.N_PAPERS


def test_check_mode_detects_a_stale_page(tmp_path, capsys):
    args = ["--papers", str(PAPERS), "--bib", str(BIB), "--toc", str(TOC), "--out", str(tmp_path / "map.md")]
    (tmp_path / "map.md").write_text(MAP.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert papermap.main(["--check", *args]) == 1
    assert "run `python -m dmlab.papermap`" in capsys.readouterr().err
    assert papermap.main(args) == 0  # rewrite
    assert papermap.main(["--check", *args]) == 0
    assert (tmp_path / "map.md").read_text(encoding="utf-8") == MAP.read_text(encoding="utf-8")


def test_removed_paper_is_reported(book, papers):
    with pytest.raises(ValueError, match=r"has 81 papers; it must list exactly 82[\s\S]*missing ids \[82\]"):
        book(papers[:-1])


def test_duplicated_id_is_reported(book, papers):
    bad = copy.deepcopy(papers)
    bad[5]["id"] = bad[4]["id"]
    with pytest.raises(ValueError, match=r"duplicate ids \[5\][\s\S]*missing ids \[6\]"):
        book(bad)


def test_typed_status_or_note_is_refused(book, papers):
    bad = copy.deepcopy(papers)
    bad[0]["status"] = "holds"
    bad[1]["note"] = "FD 1.19 vs 1.18"
    with pytest.raises(ValueError, match=r"paper 1: field\(s\) status are not allowed[\s\S]*paper 2: field\(s\) note"):
        book(bad)


def _rec(paper, chapter, status="holds", primary=True, **kw):
    return dict(paper=paper, chapter=chapter, status=status, primary=primary, claim="a claim", **kw)


def test_status_comes_from_the_primary_record(papers):
    assert papermap.status_of(73, []) == "planned"
    recs = [_rec(73, "15_feature_caching", "unresolved", primary=False), _rec(73, "15_feature_caching", "holds")]
    assert papermap.status_of(73, recs) == "holds"
    text = papermap.render_paper_map(papers, toc_path=TOC, records=recs)
    assert re.search(r"^\| 73 \| .* \| \{bdg-success\}`holds` \|$", text, flags=re.M)
    assert "sub-claim ({bdg-warning}`unresolved`" in text


def test_record_problems_are_reported(papers):
    recs = [_rec(99, "15_feature_caching"), _rec(73, "16_trajectory_stitching"),
            _rec(1, "16_trajectory_stitching"), _rec(1, "16_trajectory_stitching"),
            _rec(3, "15_feature_caching", status="planned")]
    with pytest.raises(ValueError) as e:
        papermap.validate(papers, bib_path=BIB, toc_path=TOC, records=recs)
    msg = str(e.value)
    assert "paper 99 in notebooks/15_feature_caching.ipynb: no such paper" in msg
    assert "paper 73 in notebooks/16_trajectory_stitching.ipynb: a paper's primary record belongs in its home" in msg
    assert "paper 1 has 2 primary claim records" in msg
    assert "status 'planned' is not a recorded status" in msg


def test_records_round_trip_through_a_notebook(tmp_path):
    """A record displayed by dmlab.claims.record is found by load_records in the stored notebook outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import torch\nfrom dmlab import claims\ng = torch.Generator().manual_seed(0)\n"
        "a = torch.randn(3, 50, generator=g) + 1\n"
        "iv = claims.paired_bootstrap(a, torch.zeros(3, 50), generator=g)\n"
        "claims.record(73, 'caching is faster', metric='m', diff=iv, threshold=0.0)"))
    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "15_feature_caching.ipynb"
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    nbformat.write(nb, path)
    (rec,) = papermap.load_records(tmp_path / "notebooks")
    assert rec["paper"] == 73 and rec["chapter"] == "15_feature_caching" and rec["status"] == "holds"
    assert rec["diff"]["seeds"] == 3 and rec["diff"]["low"] > 0


def test_missing_bib_key_is_reported(book, papers):
    bib = book.root / "references.bib"
    text = bib.read_text(encoding="utf-8")
    assert "@inproceedings{ma2024deepcache," in text
    bib.write_text(text.replace("@inproceedings{ma2024deepcache,", "@inproceedings{ma2024deepcacheX,"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"paper 73 \(DeepCache\): key 'ma2024deepcache' is not in .*add a BibTeX entry"):
        book(papers)


def test_recorded_chapter_missing_from_toc_is_reported(book, papers):
    toc = book.root / "_toc.yml"
    with pytest.raises(ValueError, match=r"paper 73 in notebooks/15_feature_caching.ipynb: the chapter is not listed"):
        papermap.validate(papers, bib_path=book.root / "references.bib", toc_path=toc,
                          records=[_rec(73, "15_feature_caching")])
    _add_to_toc(toc, "15_feature_caching")
    papermap.validate(papers, bib_path=book.root / "references.bib", toc_path=toc,
                      records=[_rec(73, "15_feature_caching")])


def test_unknown_chapter_is_reported(book, papers):
    bad = copy.deepcopy(papers)
    bad[2]["chapter"] = "15_caching"
    with pytest.raises(ValueError, match=r"paper 3 .*chapter '15_caching' is not in the book outline"):
        book(bad)


def test_map_links_only_chapters_in_the_toc(book, papers):
    toc = book.root / "_toc.yml"
    plain = papermap.render_paper_map(papers, toc_path=toc, records=[])
    assert "| planned: 15_feature_caching · {py:obj}`dmlab.accelerators.apply_deepcache` |" in plain
    assert "(../notebooks/15_feature_caching.ipynb)" not in plain
    _add_to_toc(toc, "15_feature_caching")
    linked = papermap.render_paper_map(papers, toc_path=toc, records=[])
    assert "| [15_feature_caching](../notebooks/15_feature_caching.ipynb) · {py:obj}`dmlab.accelerators.apply_deepcache` |" \
        in linked
    assert "planned: 15_feature_caching" not in linked


def test_papers_sit_in_their_outline_part(papers):
    text = papermap.render_paper_map(papers, toc_path=TOC)
    sections = dict(re.findall(r"^## (.+)\n([\s\S]*?)(?=^## |\Z)", text, flags=re.M))
    for p in papers:
        part = next(part for part, chapters in papermap.PARTS if p["chapter"] in chapters)
        assert re.search(rf"^\| {p['id']} \|", sections[part], flags=re.M), (p["id"], part)
    counts = dict(re.findall(r"^\| \{bdg-[a-z]+\}`([a-z-]+)` \| [^|]+ \| (\d+) \|$", text, flags=re.M))
    assert sum(map(int, counts.values())) == papermap.N_PAPERS
    assert set(counts) == set(papermap.STATUSES)
