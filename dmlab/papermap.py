"""The paper map: which of the book's 82 papers lives where, and how far the book has got with it.

``book/papers.yml`` holds one record per paper of ``shared/papers/abstracts.md`` (its number there is ``id``).
This module validates that file against ``book/references.bib`` and ``_toc.yml`` and renders it as the page
``book/paper_map.md``::

    python -m dmlab.papermap           # validate, then rewrite book/paper_map.md
    python -m dmlab.papermap --check   # validate; exit 1 if the committed page differs from the render

Only the standard library is imported at module level; PyYAML is imported inside the functions that read YAML.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["PARTS", "STATUSES", "N_PAPERS", "load_papers", "validate", "render_paper_map", "toc_files", "main"]

ROOT = Path(__file__).resolve().parent.parent  # the repository root (book/, notebooks/, _toc.yml live here)
N_PAPERS = 82

# How far the book has got with a paper, in increasing order (the legend on the page explains each one).
STATUSES = {
    "planned": "It has a home chapter; no code or notebook shows it yet.",
    "demonstrated": "Its idea runs in its chapter at tiny scale (a figure and a check), without a measured comparison.",
    "measured": "Its chapter measures the paper's claim at tiny scale against a baseline; the note says what we found.",
    "full-scale": "As measured, and also run on the real model at full scale (`DMLAB_SCALE=full`, a GPU).",
    "does-not-hold": "Measured, and the claim did not hold in our setting; the note says what we saw instead.",
}

# The book's parts and chapters (notebook stems), mirroring shared/BOOK-OUTLINE.md. A chapter added to the book
# must be added here first, so that papers.yml may name it and the map can place it in its part.
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
_FIELDS = ("id", "key", "title", "short", "chapter", "api", "status")
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


def validate(papers, *, bib_path="book/references.bib", toc_path="_toc.yml", outline_chapters=None) -> None:
    """Check the paper records; raise one ``ValueError`` listing every problem and how to fix it.

    Checks: exactly 82 records with ids 1..82 once each; the required fields; a known status; a chapter of the
    outline (``PARTS``); unique bib keys that exist in ``bib_path``; and, for every paper whose status is beyond
    ``planned``, a chapter notebook that is listed in ``toc_path`` and exists under ``notebooks/`` next to it.
    """
    chapters = set(CHAPTERS if outline_chapters is None else outline_chapters)
    problems: list[str] = []
    if not isinstance(papers, list):
        raise ValueError("papers must be a list of records, as returned by dmlab.papermap.load_papers()")
    if len(papers) != N_PAPERS:
        problems.append(f"book/papers.yml has {len(papers)} papers; it must list exactly {N_PAPERS}, one per paper "
                        "of shared/papers/abstracts.md (add the missing ones or remove the extra ones)")
    ids = []
    for n, r in enumerate(papers):
        missing = [f for f in _FIELDS if f not in r]
        if missing:
            problems.append(f"record #{n} (id {r.get('id')!r}) lacks {', '.join(missing)}: give every record "
                            f"all of {', '.join(_FIELDS)} (api may be \"\")")
        if isinstance(r.get("id"), int) and not isinstance(r.get("id"), bool):
            ids.append(r["id"])
        else:
            problems.append(f"record #{n} has id {r.get('id')!r}: ids are integers, the paper's number in abstracts.md")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"duplicate ids {dup}: each paper number appears exactly once; fix the repeated records")
    absent = sorted(set(range(1, N_PAPERS + 1)) - set(ids))
    if absent:
        problems.append(f"missing ids {absent}: add a record for each (number as in shared/papers/abstracts.md)")
    extra = sorted(i for i in set(ids) if not 1 <= i <= N_PAPERS)
    if extra:
        problems.append(f"ids {extra} are outside 1..{N_PAPERS}: use the paper's number in abstracts.md")

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
        status = r.get("status")
        if "status" in r and status not in STATUSES:
            problems.append(f"{tag}: unknown status {status!r}; use one of {', '.join(STATUSES)}")
        ch = r.get("chapter")
        if "chapter" in r and ch not in chapters:
            problems.append(f"{tag}: chapter {ch!r} is not in the book outline; use a notebook stem from "
                            "PARTS in dmlab/papermap.py (add new chapters there and to shared/BOOK-OUTLINE.md)")
        api = r.get("api")
        if "api" in r and not (api == "" or (isinstance(api, str) and re.fullmatch(r"dmlab(\.\w+)+", api))):
            problems.append(f"{tag}: api {api!r} must be \"\" or a dotted dmlab path like dmlab.accelerators.deepcache")
        note = r.get("note")
        if note is not None and (not isinstance(note, str) or "\n" in note):
            problems.append(f"{tag}: note must be one line of text")

    in_toc = _toc_chapters(toc_path)
    book_root = _resolve(toc_path).parent
    for r in papers:
        if r.get("status") in STATUSES and r["status"] != "planned":
            ch = r.get("chapter")
            tag = f"paper {r.get('id')} ({r.get('short', r.get('key'))}) has status {r['status']!r} but"
            if ch not in in_toc:
                problems.append(f"{tag} its chapter notebooks/{ch} is not listed in {toc_path}; add "
                                f"`- file: notebooks/{ch}` to its part there, or set the status back to planned")
            elif not (book_root / "notebooks" / f"{ch}.ipynb").exists():
                problems.append(f"{tag} notebooks/{ch}.ipynb does not exist; commit the notebook or set the "
                                "status back to planned")
    if problems:
        raise ValueError("book/papers.yml is not valid:\n  - " + "\n  - ".join(problems))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_paper_map(papers, *, toc_path="_toc.yml") -> str:
    """The Markdown (MyST) source of ``book/paper_map.md``.

    A chapter is linked to its notebook only if ``toc_path`` lists it; otherwise it reads ``planned: <stem>``.
    """
    in_toc = _toc_chapters(toc_path)
    by_chapter: dict[str, list[dict]] = {}
    for r in sorted(papers, key=lambda r: r["id"]):
        by_chapter.setdefault(r["chapter"], []).append(r)

    def chapter_ref(ch):
        return f"[{ch}](../notebooks/{ch}.ipynb)" if ch in in_toc else f"planned: {ch}"

    counts = {s: sum(r["status"] == s for r in papers) for s in STATUSES}
    out = [
        "% Generated from book/papers.yml by `python -m dmlab.papermap`; do not edit by hand.",
        "",
        "# Paper map",
        "",
        f"This book covers {len(papers)} recent papers on diffusion models. Each has one home chapter, where its idea "
        "is derived, run and, where the book can, measured; it may be cited anywhere else. The table below says "
        "where each paper lives, where its code is in `dmlab`, and how far the book has got with it. A status is "
        "a claim about this book, not about the paper: `measured` means we measured the paper's claim at tiny "
        "scale, and `does-not-hold` means that measurement disagreed with the paper in our setting (the note says "
        "how).",
        "",
        "| status | meaning |",
        "|---|---|",
        *[f"| `{s}` | {_cell(m)} |" for s, m in STATUSES.items()],
        "",
        "A chapter in plain text (`planned: …`) has no notebook in the book yet.",
        "",
    ]
    for part, chapters in PARTS:
        rows = [r for ch in chapters for r in by_chapter.get(ch, [])]
        if not rows:
            continue
        out += [f"## {part}", "", "| # | paper | chapter | dmlab API | status | note |", "|---|---|---|---|---|---|"]
        for r in rows:
            api = f"`{r['api']}`" if r.get("api") else "—"
            short, title = r["short"], r["title"]
            if title.lower().startswith(short.lower() + ":"):  # "DeepCache: Accelerating ..." -> no repetition
                title = title[len(short) + 1:].lstrip()
            paper = f"**{_cell(short)}**: {_cell(title)} {{cite:p}}`{r['key']}`"
            out.append(f"| {r['id']} | {paper} | {chapter_ref(r['chapter'])} | {api} | `{r['status']}` "
                       f"| {_cell(r.get('note') or '')} |")
        out.append("")
    out += ["## Summary", "", "| status | papers |", "|---|---|",
            *[f"| `{s}` | {n} |" for s, n in counts.items()], f"| total | {len(papers)} |", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m dmlab.papermap [--check]``: validate book/papers.yml and (re)write or check book/paper_map.md."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m dmlab.papermap", description=main.__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from the render")
    ap.add_argument("--papers", default="book/papers.yml")
    ap.add_argument("--bib", default="book/references.bib")
    ap.add_argument("--toc", default="_toc.yml")
    ap.add_argument("--out", default="book/paper_map.md")
    args = ap.parse_args(argv)
    papers = load_papers(args.papers)
    try:
        validate(papers, bib_path=args.bib, toc_path=args.toc)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    text = render_paper_map(papers, toc_path=args.toc)
    out = _resolve(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            print(f"{args.out} is out of date with book/papers.yml (or _toc.yml); run `{_HOW}` and commit the result",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(papers)} papers)")
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(papers)} papers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
