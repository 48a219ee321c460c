"""A page rendered in a real headless browser (Debian's chromium), for the HTML report tests.

:func:`assert_renders_offline` opens a self-contained page at ``file://``, takes a screenshot and
logs every request the page made, asserts that the screenshot is not blank and that nothing but
``file:`` and ``data:`` URLs was asked for, and returns the DOM after rendering.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

WINDOW = (1200, 2000)  # width, height of the screenshot


def _chromium() -> list[str]:
    binary = shutil.which("chromium")
    assert binary, "this test needs Debian's chromium: apt-get install chromium (.ci/run installs it)"
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--window-size={WINDOW[0]},{WINDOW[1]}"]


def assert_renders_offline(page: Path, workdir: Path) -> str:
    """Render ``page`` in headless chromium (profile and logs in ``workdir``); returns the DOM."""
    flags = [*_chromium(), f"--user-data-dir={workdir / 'profile'}"]
    shot = workdir / "screenshot.png"
    log = workdir / "netlog.json"
    subprocess.run([*flags, f"--screenshot={shot}", f"--log-net-log={log}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[:2] == (WINDOW[1], WINDOW[0])
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and (rgb < 250).any(axis=2).mean() > 0.01  # text and charts, not a blank page
    # every URL the page asked for (the browser's own background requests have the initiator
    # "not an origin"; a page at file:// has the opaque origin "null"): only file: and data:
    text = log.read_text().rstrip()
    events = json.loads(text if text.endswith("}") else text.rstrip(",") + "]}")["events"]
    asked = {e["params"]["url"] for e in events
             if "url" in e.get("params", {}) and e["params"].get("initiator", "not an origin") != "not an origin"}
    assert not [u for u in asked if not u.startswith(("file:", "data:"))], asked
    return subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                          timeout=120).stdout
