"""Render a Snakemake report in headless Chromium and read back what a person would see.

The report is a single-page app: results appear only after clicking through its navigation. A copy of
the report gets a small script that clicks the given entries in turn (by their visible text; ``eye:TEXT``
clicks the "show" button of the result row labelled TEXT) and then records, on ``<body>``, the images
the browser actually decoded (``naturalWidth > 0``). ``chromium --headless --dump-dom`` returns the DOM
after the page's scripts ran.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_SCRIPT = """<script>
(function () {
  function find(t) {
    const eye = t.startsWith('eye:'); if (eye) t = t.slice(4);
    const el = [...document.querySelectorAll('#app *')].find(e => e.children.length === 0 && e.textContent.trim() === t
                                                             && (!eye || e.closest('tr')));
    if (!el || !eye) return el;
    return el.closest('tr').querySelector('a[iconname=eye]');
  }
  const steps = %s; let i = 0;
  const timer = setInterval(() => {
    if (i < steps.length) {
      const el = find(steps[i]);
      if (el) { el.click(); document.body.setAttribute('data-clicked', String(++i)); }
      return;
    }
    const imgs = [...document.querySelectorAll('#app img')].filter(im => im.complete && im.naturalWidth > 0)
      .map(im => ((im.src.match(/filename=([^;]+);/) || [])[1] || '') + ':' + im.naturalWidth + 'x' + im.naturalHeight);
    document.body.setAttribute('data-decoded-images', imgs.join(' '));
  }, 250);
})();
</script>"""


def chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def render(report: Path, steps: list[str], workdir: Path) -> str:
    """The DOM of ``report`` after clicking through ``steps`` (see the module docstring)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("no chromium in PATH")
    text = Path(report).read_text()
    cut = text.rfind("</body>")  # the last one: embedded results may contain their own
    probe = Path(workdir) / f"probe-{abs(hash(tuple(steps)))}.html"
    probe.write_text(text[:cut] + _SCRIPT % json.dumps(steps) + text[cut:])
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=15000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or "<body" not in proc.stdout:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def clicked(dom: str) -> int:
    m = re.search(r'<body[^>]*data-clicked="(\d+)"', dom)
    return int(m.group(1)) if m else 0


def decoded_images(dom: str) -> dict[str, tuple[int, int]]:
    """Images the browser decoded in the app: file name -> (width, height)."""
    m = re.search(r'<body[^>]*data-decoded-images="([^"]*)"', dom)
    out = {}
    for item in (m.group(1).split() if m else []):
        name, _, size = item.rpartition(":")
        w, h = size.split("x")
        out[name] = (int(w), int(h))
    return out


def iframe_documents(dom: str) -> list[str]:
    """Decoded HTML of the ``data:text/html;base64`` iframes the app shows."""
    frames = re.findall(r'<iframe[^>]+src="data:text/html;[^"]*base64,([^"]+)"', dom)
    return [base64.b64decode(b).decode() for b in frames]


def visible_text(dom: str) -> str:
    """Text of the app's DOM (scripts and styles left out)."""
    app = dom[dom.find('<div id="app">'):]
    app = re.sub(r"<(script|style)\b.*?</\1>", " ", app, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", app))
