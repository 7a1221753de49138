"""dmlab.tools.pages finds what a reader would see cut off or unrendered (needs Chromium; skipped without it)."""
import shutil

import pytest

from dmlab.tools import pages

needs_browser = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="Chromium and ChromeDriver are not installed (apt-get install chromium chromium-driver)")


@needs_browser
def test_page_check_flags_overflow_and_raw_math_and_passes_a_clean_page(tmp_path):
    pytest.importorskip("selenium")
    wide = "x = " + "1 + " * 200 + "1"
    (tmp_path / "index.html").write_text(
        "<html><body><div class='bd-article' style='width:600px'><div class='highlight'>"
        f"<pre style='overflow:auto'>{wide}</pre></div><p>raw math \\(a^2\\) here</p></div></body></html>")
    (tmp_path / "clean.html").write_text(
        "<html><body><div class='bd-article' style='width:600px'><div class='highlight'>"
        "<pre style='overflow:auto'>x = 1</pre></div><p>no math</p></div></body></html>")
    report = pages.check_pages(tmp_path, shots=False)
    assert report["clean.html"] == []
    probs = report["index.html"]
    assert any(p.startswith("code ") and "too wide" in p for p in probs), probs
    assert any("unrendered math" in p for p in probs), probs


def test_missing_build_names_the_fix(tmp_path):
    pytest.importorskip("selenium")
    with pytest.raises(FileNotFoundError, match="python -m dmlab.tools.book"):
        pages.check_pages(tmp_path)
