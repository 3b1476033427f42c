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
import signal
import subprocess
import tempfile
import time
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


def _run(exe: str, args: list[str], timeout: float, finished, attempts: int = 3) -> str:
    """Run Chromium with `args` and return its stdout once `finished(stdout, stderr)` says the work
    is done, or once it exits. New headless Chromium now and then writes its output and then never
    exits (it hung a CI run for the full timeout), so a finished job is not waited on: its process
    group is killed. A run that produced nothing in `timeout` seconds is killed and tried again."""
    for _ in range(attempts):
        with tempfile.TemporaryDirectory(prefix="picaco-chromium-") as scratch:
            profile, out_path, err_path = (Path(scratch) / n for n in ("profile", "stdout", "stderr"))
            cmd = [exe, *BASE_FLAGS, f"--user-data-dir={profile}", *args]
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group, to kill the helpers too
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if finished(_read(out_path), _read(err_path)):
                    break
                time.sleep(0.2)
            exited = proc.poll() is not None
            if not exited:
                _kill_group(proc)
            stdout, stderr = _read(out_path), _read(err_path)
        if finished(stdout, stderr):
            return stdout
        if exited:  # it stopped by itself without doing the work: trying again would not help
            raise RuntimeError(f"chromium exited with {proc.returncode} without finishing: {stderr[-2000:]}")
    raise RuntimeError(f"chromium did not finish in {timeout:.0f} s, {attempts} times: {stderr[-2000:]}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def screenshot(exe: str, html: Path, png: Path, *, width: int = 1280, height: int = 2400,
               timeout: float = 60.0) -> Path:
    """Draw `html` in a window of width x height CSS pixels and save it as `png`."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)

    def written(stdout: str, stderr: str) -> bool:  # Chromium reports the file once it is complete
        return f"written to file {png}" in stdout + stderr and png.is_file()

    _run(exe, [f"--screenshot={png}", f"--window-size={width},{height}",
               "--run-all-compositor-stages-before-draw", Path(html).resolve().as_uri()], timeout, written)
    return png


def dump_dom(exe: str, html: Path, *, timeout: float = 60.0) -> str:
    """The page's DOM, serialized after the load event (so after its scripts ran)."""
    return _run(exe, ["--dump-dom", Path(html).resolve().as_uri()], timeout,
                lambda stdout, _: "</html>" in stdout)


def distinct_colours(png: Path, *, step: int = 4) -> int:
    """How many distinct RGB colours a PNG holds (sampled every `step` pixels each way); a blank or
    failed render has one or two. Pillow comes with matplotlib, which the report needs anyway."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        small = rgb.resize((max(1, rgb.width // step), max(1, rgb.height // step)), Image.NEAREST)
        return len(small.getcolors(maxcolors=small.width * small.height))
