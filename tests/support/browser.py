"""Open an HTML file in a real headless Chromium: take a screenshot, or dump the DOM after scripts ran.

    exe = find_chromium()               # None when no Chromium is installed
    screenshot(exe, html, png)          # a PNG of the page as a browser draws it
    dom = dump_dom(exe, html)           # the serialized DOM after the page's scripts ran

Debian's package installs `/usr/bin/chromium` (`apt-get install -y chromium`); PICACO_CHROMIUM
names another binary. Every run gets a fresh, throw-away profile and the flags that keep Chromium
off the network (no background updates, sync or QUIC), so a test sees only the file it opened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
INSTALL_HINT = "install it with `apt-get install -y chromium` (or set PICACO_CHROMIUM)"

BASE_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers makes the renderer crash
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def find_chromium() -> str | None:
    """The Chromium binary to use, or None."""
    named = os.environ.get("PICACO_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for path in CANDIDATES:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(exe: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="picaco-chromium-") as profile:
        cmd = [exe, *BASE_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def screenshot(exe: str, html: Path, png: Path, *, width: int = 1280, height: int = 2400,
               timeout: float = 90.0) -> Path:
    """Draw `html` in a window of width x height CSS pixels and save it as `png`."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    _run(exe, [f"--screenshot={png}", f"--window-size={width},{height}",
               "--run-all-compositor-stages-before-draw", Path(html).resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def dump_dom(exe: str, html: Path, *, timeout: float = 90.0) -> str:
    """The page's DOM, serialized after the load event (so after its scripts ran)."""
    return _run(exe, ["--dump-dom", Path(html).resolve().as_uri()], timeout).stdout


def distinct_colours(png: Path, *, step: int = 4) -> int:
    """How many distinct RGB colours a PNG holds (sampled every `step` pixels each way); a blank or
    failed render has one or two. Pillow comes with matplotlib, which the report needs anyway."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        small = rgb.resize((max(1, rgb.width // step), max(1, rgb.height // step)), Image.NEAREST)
        return len(small.getcolors(maxcolors=small.width * small.height))
