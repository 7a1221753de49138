"""The paper map: which of the book's 82 papers lives where, and what its chapter measured.

Two sources, neither holding a typed number:

* ``book/papers.yml``: one record per paper with static fields only (``id``, ``key``, ``title``, ``short``,
  ``chapter``, ``api``), validated against ``book/references.bib`` and ``_toc.yml``;
* the claim records (:func:`dmlab.claims.record`) stored in the executed chapters under ``notebooks/``: a paper's
  status and every number the map shows come from them. A paper without a record is ``planned``.

::

    python -m dmlab.papermap           # validate, then rewrite book/paper_map.md
    python -m dmlab.papermap --check   # validate; exit 1 if the committed page differs from the render
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .claims import MIME, STATUSES, Interval, fmt

__all__ = ["PARTS", "STATUSES", "N_PAPERS", "load_papers", "load_records", "validate", "render_paper_map",
           "status_of", "toc_files", "main"]

ROOT = Path(__file__).resolve().parent.parent  # the repository root (book/, notebooks/, _toc.yml live here)
N_PAPERS = 82

# The book's parts and chapters (notebook stems). A chapter added to the book must be added here first, so that
# papers.yml may name it and the map can place it in its part.
PARTS: list[tuple[str, list[str]]] = [
    ("Preface", ["00_welcome"]),
    ("I Foundations", ["01_forward_and_exact", "02_score_sde"]),
    ("II Samplers", ["03_samplers_are_ode_solvers", "04_stochastic_samplers", "05_fast_solvers",
                     "06_flows_and_interpolants", "07_schedules_and_boundaries"]),
    ("III Models", ["08_model_zoo"]),
    ("IV Probes", ["09_diffusion_classifier", "10_features_and_correspondence", "11_encoder_drift",
                   "12_fokker_planck", "13_gauge_and_dimension", "14_densities_and_subspaces"]),
    ("V Accelerators", ["15_feature_caching", "16_trajectory_stitching", "17_early_exit", "18_quantization",
                        "19_pruning", "20_linear_attention", "21_speed_quality_frontier"]),
    ("VI Training & distillation", ["22_guidance_and_steering", "23_efficient_finetuning",
                                    "24_guidance_distillation", "25_consistency_and_few_step",
                                    "26_distribution_matching", "27_architecture_distillation"]),
    ("VII Applications", ["28_super_resolution", "29_dense_prediction", "30_editing_and_watermarks",
                          "31_score_distillation_3d", "32_beyond_images", "33_latent_spaces"]),
]
CHAPTERS = [c for _, chapters in PARTS for c in chapters]
_PART_OF = {c: part for part, chapters in PARTS for c in chapters}
_FIELDS = ("id", "key", "title", "short", "chapter", "api")
_HOW = "python -m dmlab.papermap"


def _resolve(path) -> Path:
    """A relative path is taken from the current directory if it exists there, else from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p


def load_papers(path="book/papers.yml") -> list[dict]:
    """Read ``book/papers.yml``: a list of records ``{id, key, title, short, chapter, api, status[, note]}``."""
    import yaml

    p = _resolve(path)
    with open(p, encoding="utf-8") as f:
        papers = yaml.safe_load(f)
    if not isinstance(papers, list) or not all(isinstance(r, dict) for r in papers):
        raise ValueError(f"{p} must be a YAML list of mappings (one `- id: N` record per paper)")
    return papers


def bib_keys(bib_path) -> set[str]:
    """The entry keys of a BibTeX file (``@comment``, ``@string`` and ``@preamble`` are not entries)."""
    text = _resolve(bib_path).read_text(encoding="utf-8")
    found = re.findall(r"^\s*@\s*(\w+)\s*[{(]\s*([^,\s]+)\s*,", text, flags=re.M)
    return {key for kind, key in found if kind.lower() not in {"comment", "string", "preamble"}}


def toc_files(toc_path="_toc.yml") -> list[str]:
    """Every document of a Jupyter Book ``_toc.yml`` (``root`` and each ``file``), as paths without extension."""
    import yaml

    with open(_resolve(toc_path), encoding="utf-8") as f:
        toc = yaml.safe_load(f) or {}
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for k in ("root", "file"):
                if isinstance(node.get(k), str):
                    out.append(re.sub(r"\.(ipynb|md)$", "", node[k]))
            for v in node.values():
                if isinstance(v, (list, dict)):
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return out


def _toc_chapters(toc_path) -> set[str]:
    """Notebook stems listed in the toc as ``notebooks/<stem>``."""
    return {f.split("/", 1)[1] for f in toc_files(toc_path) if f.startswith("notebooks/") and f.count("/") == 1}


def load_records(notebooks="notebooks") -> list[dict]:
    """Every claim record stored in the executed chapters ``notebooks/*.ipynb``, in chapter and cell order; each
    is the record's JSON (:meth:`dmlab.claims.Claim.to_json`) with ``chapter`` (the notebook stem) added."""
    out = []
    for nb in sorted(_resolve(notebooks).glob("*.ipynb")):
        try:
            cells = json.loads(nb.read_text(encoding="utf-8")).get("cells", [])
        except json.JSONDecodeError as e:
            raise ValueError(f"{nb} is not valid JSON ({e}); restore it with git checkout or re-execute it") from e
        for cell in cells:
            for o in cell.get("outputs", []) or []:
                d = (o.get("metadata") or {}).get(MIME)
                if d is not None:
                    d = dict(json.loads(d) if isinstance(d, str) else d)
                    d["chapter"] = nb.stem
                    out.append(d)
    return out


def status_of(paper_id: int, records) -> str:
    """A paper's status: its primary record's, or ``planned`` when no chapter records it."""
    prim = [r for r in records if r.get("paper") == paper_id and r.get("primary", True)]
    return prim[0]["status"] if prim else "planned"


def validate(papers, *, bib_path="book/references.bib", toc_path="_toc.yml", outline_chapters=None,
             records=None) -> None:
    """Check the paper records and the claim records; raise one ``ValueError`` listing every problem and its fix.

    Checks: exactly 82 papers with ids 1..82 once each; the static fields only (a ``status`` or ``note`` typed in
    papers.yml is refused: they come from claim records); a chapter of the outline (``PARTS``); unique bib keys
    that exist in ``bib_path``. For the claim records (``records``, default: those in ``notebooks/`` next to
    ``toc_path``): a known paper and status; at most one primary record per paper, in the paper's home chapter;
    that chapter listed in ``toc_path``.
    """
    chapters = set(CHAPTERS if outline_chapters is None else outline_chapters)
    problems: list[str] = []
    if not isinstance(papers, list):
        raise ValueError("papers must be a list of records, as returned by dmlab.papermap.load_papers()")
    if len(papers) != N_PAPERS:
        problems.append(f"book/papers.yml has {len(papers)} papers; it must list exactly {N_PAPERS}, one per paper "
                        "of the book (add the missing ones or remove the extra ones)")
    ids = []
    for n, r in enumerate(papers):
        missing = [f for f in _FIELDS if f not in r]
        if missing:
            problems.append(f"record #{n} (id {r.get('id')!r}) lacks {', '.join(missing)}: give every record "
                            f"all of {', '.join(_FIELDS)} (api may be \"\")")
        typed = [f for f in r if f not in _FIELDS]
        if typed:
            problems.append(f"paper {r.get('id')!r}: field(s) {', '.join(map(str, typed))} are not allowed in "
                            "book/papers.yml; a paper's status and numbers come from dmlab.claims.record() in its "
                            "chapter, so remove them here")
        if isinstance(r.get("id"), int) and not isinstance(r.get("id"), bool):
            ids.append(r["id"])
        else:
            problems.append(f"record #{n} has id {r.get('id')!r}: ids are integers, the paper's number")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"duplicate ids {dup}: each paper number appears exactly once; fix the repeated records")
    absent = sorted(set(range(1, N_PAPERS + 1)) - set(ids))
    if absent:
        problems.append(f"missing ids {absent}: add a record for each")
    extra = sorted(i for i in set(ids) if not 1 <= i <= N_PAPERS)
    if extra:
        problems.append(f"ids {extra} are outside 1..{N_PAPERS}: use the paper's number")

    keys = [r.get("key") for r in papers if r.get("key")]
    dup_keys = sorted({k for k in keys if keys.count(k) > 1})
    if dup_keys:
        problems.append(f"bib keys used by more than one paper: {dup_keys}; each paper has its own entry")
    known = bib_keys(bib_path)
    for r in papers:
        tag = f"paper {r.get('id')} ({r.get('short', r.get('key'))})"
        if r.get("key") and r["key"] not in known:
            problems.append(f"{tag}: key {r['key']!r} is not in {bib_path}; add a BibTeX entry with that key "
                            "(or correct the key in book/papers.yml)")
        ch = r.get("chapter")
        if "chapter" in r and ch not in chapters:
            problems.append(f"{tag}: chapter {ch!r} is not in the book outline; use a notebook stem from "
                            "PARTS in dmlab/papermap.py (add new chapters there first)")
        api = r.get("api")
        if "api" in r and not (api == "" or (isinstance(api, str) and re.fullmatch(r"dmlab(\.\w+)+", api))):
            problems.append(f"{tag}: api {api!r} must be \"\" or a dotted dmlab path like dmlab.accelerators.deepcache")

    in_toc = _toc_chapters(toc_path)
    if records is None:
        records = load_records(_resolve(toc_path).parent / "notebooks")
    home = {r.get("id"): r.get("chapter") for r in papers}
    primaries: dict[int, list[str]] = {}
    for rec in records:
        pid, ch = rec.get("paper"), rec.get("chapter")
        tag = f"claim record for paper {pid!r} in notebooks/{ch}.ipynb"
        if pid not in home:
            problems.append(f"{tag}: no such paper in book/papers.yml; use the paper's id (1..{N_PAPERS})")
            continue
        if rec.get("status") not in STATUSES or rec.get("status") == "planned":
            problems.append(f"{tag}: status {rec.get('status')!r} is not a recorded status; use "
                            "dmlab.claims.record() and re-execute the chapter")
        if ch not in in_toc:
            problems.append(f"{tag}: the chapter is not listed in {toc_path}; add `- file: notebooks/{ch}` there")
        if rec.get("primary", True):
            primaries.setdefault(pid, []).append(ch)
            if ch != home[pid]:
                problems.append(f"{tag}: a paper's primary record belongs in its home chapter notebooks/"
                                f"{home[pid]}.ipynb; record it there, or pass primary=False for a sub-claim")
    for pid, chs in sorted(primaries.items()):
        if len(chs) > 1:
            problems.append(f"paper {pid} has {len(chs)} primary claim records ({', '.join(chs)}); keep one and "
                            "pass primary=False to the others")
    if problems:
        raise ValueError("the paper map is not valid:\n  - " + "\n  - ".join(problems))


# A coloured badge per status (sphinx-design's bdg roles, part of Jupyter Book 1).
_BADGE = {"holds": "success", "does-not-hold": "danger", "unresolved": "warning", "demonstrated": "info",
          "full-scale-only": "secondary", "planned": "light"}


def _badge(status: str) -> str:
    return f"{{bdg-{_BADGE[status]}}}`{status}`"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _record_line(rec: dict) -> str:
    """One claim record in words: claim, metric, values, the interval of the difference, the verdict."""
    parts = [f"{_cell(rec['claim'])}"]
    vals = []
    if rec.get("value") is not None:
        vals.append(f"{rec.get('method') or 'method'} {fmt(rec['value'])}")
    if rec.get("competitor_value") is not None:
        vals.append(f"{rec.get('competitor') or 'competitor'} {fmt(rec['competitor_value'])}")
    elif rec.get("competitor"):
        vals.append(f"against {rec['competitor']}")
    if rec.get("metric"):
        parts.append(f"*{_cell(rec['metric'])}*" + (": " + ", ".join(vals) if vals else ""))
    if rec.get("diff"):
        iv = Interval(**rec["diff"])
        side = ">" if rec.get("better", "higher") == "higher" else "<"
        parts.append(f"difference {fmt(iv)} at {round(iv.level * 100)}% (claim needs {side} "
                     f"{rec.get('threshold', 0):g}; n = {iv.n} per seed, {iv.seeds} seeds)")
    if rec.get("note"):
        parts.append(_cell(rec["note"]))
    return ". ".join(parts)


def render_paper_map(papers, *, toc_path="_toc.yml", records=None) -> str:
    """The Markdown (MyST) source of ``book/paper_map.md``, from the static ``papers`` and the claim ``records``
    (default: those stored in ``notebooks/`` next to ``toc_path``).

    A chapter is linked to its notebook only if ``toc_path`` lists it; otherwise it reads ``planned: <stem>``.
    """
    in_toc = _toc_chapters(toc_path)
    if records is None:
        records = load_records(_resolve(toc_path).parent / "notebooks")
    by_paper: dict[int, list[dict]] = {}
    for rec in records:
        by_paper.setdefault(rec["paper"], []).append(rec)
    by_chapter: dict[str, list[dict]] = {}
    for r in sorted(papers, key=lambda r: r["id"]):
        by_chapter.setdefault(r["chapter"], []).append(r)

    def chapter_ref(ch):
        return f"[{ch}](../notebooks/{ch}.ipynb)" if ch in in_toc else f"planned: {ch}"

    status = {r["id"]: status_of(r["id"], by_paper.get(r["id"], [])) for r in papers}
    counts = {s: sum(v == s for v in status.values()) for s in STATUSES}
    out = [
        f"% Generated by `{_HOW}` from book/papers.yml and the claim records stored in the executed chapters; "
        "do not edit by hand.",
        "",
        "# Paper map",
        "",
        f"This book covers {len(papers)} recent papers on diffusion models. Each has one home chapter, where its idea "
        "is derived, run and, where the book can, measured. Every status and number on this page is generated from "
        "the *claim records* the chapters write in the cell that measures them (`dmlab.claims.record`); nothing "
        "here is typed by hand.",
        "",
        "**How a verdict is decided.** The paper's method is compared with its trivial competitor at matched cost "
        "(the same sampler at fewer steps and matched FLOPs for an accelerator, the best hand-designed solver for a "
        "solver, the simplest baseline for a probe) through a paired difference on the same noise or samples. Its "
        "95% interval comes from a two-stage bootstrap (seeds, then samples within seeds) over at least 3 seeds of "
        "what the claim depends on. The claim *holds* when the whole interval lies on the paper's side of the "
        "threshold, *does not hold* when it lies wholly on the other side, and is *unresolved* when the interval "
        "straddles it. A status is a statement about this book's tiny-scale test, not about the paper.",
        "",
        "| status | meaning | papers |",
        "|---|---|---|",
        *[f"| {_badge(s)} | {_cell(m)} | {counts[s]} |" for s, m in STATUSES.items()],
        f"| total | | {len(papers)} |",
        "",
    ]
    for part, chapters in PARTS:
        rows = [r for ch in chapters for r in by_chapter.get(ch, [])]
        if not rows:
            continue
        out += [f"## {part}", "", "| # | paper | chapter and code | status |", "|---|---|---|---|"]
        for r in rows:
            api = f" · {{py:obj}}`{r['api']}`" if r.get("api") else ""  # a link into book/api.md
            short, title = r["short"], r["title"]
            if title.lower().startswith(short.lower() + ":"):  # "DeepCache: Accelerating ..." -> no repetition
                title = title[len(short) + 1:].lstrip()
            paper = f"**{_cell(short)}**: {_cell(title)} {{cite:p}}`{r['key']}`"
            out.append(f"| {r['id']} | {paper} | {chapter_ref(r['chapter'])}{api} | {_badge(status[r['id']])} |")
        out.append("")
        recorded = [r for r in rows if by_paper.get(r["id"])]
        if recorded:
            out += ["**What the chapters recorded**", ""]
            for r in recorded:
                recs = sorted(by_paper[r["id"]], key=lambda c: not c.get("primary", True))
                for k, rec in enumerate(recs):
                    lead = f"**{r['id']} {_cell(r['short'])}**"
                    where = chapter_ref(rec["chapter"])
                    out.append(f"- {lead} ({_badge(rec['status'])}, {where}): {_record_line(rec)}"
                               if k == 0 else f"  - sub-claim ({_badge(rec['status'])}, {where}): {_record_line(rec)}")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m dmlab.papermap [--check]``: validate book/papers.yml and the chapters' claim records, and
    (re)write or check book/paper_map.md."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m dmlab.papermap", description=main.__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from the render")
    ap.add_argument("--papers", default="book/papers.yml")
    ap.add_argument("--bib", default="book/references.bib")
    ap.add_argument("--toc", default="_toc.yml")
    ap.add_argument("--out", default="book/paper_map.md")
    args = ap.parse_args(argv)
    try:
        papers = load_papers(args.papers)
        records = load_records(_resolve(args.toc).parent / "notebooks")
        validate(papers, bib_path=args.bib, toc_path=args.toc, records=records)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    text = render_paper_map(papers, toc_path=args.toc, records=records)
    out = _resolve(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            print(f"{args.out} is out of date with book/papers.yml or the chapters' claim records; run `{_HOW}` "
                  "and commit the result", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(papers)} papers, {len(records)} claim records)")
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(papers)} papers, {len(records)} claim records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
