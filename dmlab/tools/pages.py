"""Look at the built book in a real browser: every page at 1400x900 in headless Chromium.

``python -m dmlab.tools.pages`` (after ``python -m dmlab.tools.book``) opens each ``_build/html`` page, saves a
full-page screenshot under ``_build/screenshots/`` and reports, per page:

* code cells, text outputs and tables whose content is wider than their box (cut off or scrolled);
* math left as raw ``\\(`` / ``$$`` text (MathJax did not render it);
* requests that leave the machine (anything but ``file://`` and ``data:``).

The highlighted library source under ``_modules/`` (120-column code) is not checked.

Exit status 1 when any page has a problem. Needs Chromium and ChromeDriver (Debian: ``apt-get install chromium
chromium-driver``) and ``pip install selenium``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

__all__ = ["check_pages", "browser_paths", "main", "ROOT"]

ROOT = pathlib.Path(__file__).resolve().parents[2]

_PROBE = r"""
const out = {overflow: [], raw_math: 0};
const boxes = document.querySelectorAll(
  'div.cell_input pre, div.cell_output pre, div.output pre, div.highlight pre, .bd-article table');
for (const el of boxes) {
  if (el.scrollWidth > el.clientWidth + 2) {
    const kind = el.tagName === 'TABLE' ? 'table' : (el.closest('.cell_output, .output') ? 'output' : 'code');
    out.overflow.push({kind: kind, over: el.scrollWidth - el.clientWidth,
                       text: (el.innerText || '').split('\n')[0].slice(0, 60)});
  }
}
const body = document.querySelector('.bd-article');
if (body) {
  const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
  let n; while ((n = walker.nextNode())) {
    if (n.parentElement.closest('pre, code, script, mjx-container')) continue;
    if (/\\\(|\\\[|\$\$/.test(n.nodeValue)) out.raw_math++;
  }
}
out.requests = performance.getEntriesByType('resource').map(e => e.name)
  .filter(u => !u.startsWith('file:') && !u.startsWith('data:'));
return out;
"""


# wait until MathJax has typeset the page (when it is on the page), then a moment for late layout; 10 s at most
_SETTLE = r"""
const done = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
return Promise.race([done.then(() => new Promise(r => setTimeout(r, 300))),
                     new Promise(r => setTimeout(r, 10000))]);
"""


def browser_paths() -> tuple[str | None, str | None]:
    """``(chromium, chromedriver)`` executables on this machine (``None`` for one that is missing)."""
    import shutil

    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return chromium, shutil.which("chromedriver")


def check_pages(html_dir=None, *, width: int = 1400, height: int = 900, narrow: int | None = 1200,
                shots: bool = True) -> dict:
    """``{page: problems}`` for every HTML page of the built book (an empty list when a page is fine).

    Each page is probed at ``width`` (and photographed there) and, when ``narrow`` is given, again at that window
    width for overflow only: about 1200 px is the narrowest window where the theme still shows both sidebars, so the
    article, and the 88-column code in it, is at its narrowest there.
    """
    try:
        from selenium import webdriver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("the page check needs selenium: pip install selenium (and Chromium + ChromeDriver: "
                           "apt-get install chromium chromium-driver)") from e
    html = pathlib.Path(html_dir or ROOT / "_build" / "html")
    if not (html / "index.html").exists():
        raise FileNotFoundError(f"{html}/index.html not found; build the book first: python -m dmlab.tools.book")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    chromium, driver = browser_paths()
    if chromium is None or driver is None:
        raise RuntimeError("the page check needs Chromium and ChromeDriver: apt-get install chromium chromium-driver")
    opts.binary_location = chromium
    service = webdriver.ChromeService(executable_path=driver)
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(30)
    out_dir = html.parent / "screenshots"
    out_dir.mkdir(exist_ok=True)
    report = {}
    try:
        # _modules/ holds the library's highlighted source (120-column code, scrolled sideways like any editor),
        # not the book's text: it is not checked
        pages = sorted(p for p in html.rglob("*.html") if not {"_static", "_modules"} & set(p.parts)
                       and p.name not in ("search.html", "genindex.html", "py-modindex.html"))
        for p in pages:
            rel = p.relative_to(html).as_posix()
            try:
                drv.get(p.as_uri())
            except Exception as e:  # a page that never finishes loading (a blocked CDN) is a problem too
                report[rel] = [f"did not load in 30 s ({type(e).__name__})"]
                continue
            drv.execute_script(_SETTLE)
            r = drv.execute_script(_PROBE)
            probs = [f"{o['kind']} {o['over']} px too wide: {o['text']!r}" for o in r["overflow"]]
            if narrow:
                drv.set_window_size(narrow, height)
                probs += [f"{o['kind']} {o['over']} px too wide at {narrow} px: {o['text']!r}"
                          for o in drv.execute_script(_PROBE)["overflow"]]
                drv.set_window_size(width, height)
            if r["raw_math"]:
                probs.append(f"{r['raw_math']} text node(s) with unrendered math")
            probs += [f"network request: {u}" for u in sorted(set(r["requests"]))]
            report[rel] = probs
            if shots:  # the whole page (up to 20,000 px) as JPEG through the DevTools protocol: no relayout
                import base64

                h = min(int(drv.execute_script("return document.documentElement.scrollHeight")), 20000)
                shot = drv.execute_cdp_cmd("Page.captureScreenshot", {
                    "format": "jpeg", "quality": 70, "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1}})
                (out_dir / (rel.replace("/", "__") + ".jpg")).write_bytes(base64.b64decode(shot["data"]))
    finally:
        drv.quit()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmlab.tools.pages", description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default=None, help="the built book (default _build/html)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--no-shots", action="store_true")
    a = ap.parse_args(argv)
    report = check_pages(a.html, shots=not a.no_shots)
    bad = {k: v for k, v in report.items() if v}
    for page, probs in bad.items():
        print(f"{page}: {len(probs)} problem(s)")
        for pr in probs[:8]:
            print(f"    {pr}")
        if len(probs) > 8:
            print(f"    ... and {len(probs) - 8} more")
    print(f"{len(report) - len(bad)} of {len(report)} pages fine")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
