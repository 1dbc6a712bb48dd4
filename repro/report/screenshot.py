"""A PNG screenshot of a rendered report with headless Chromium, for the README.

    python -m repro.report.screenshot reports/index.html reports/screenshot.png [--width 1200 --height 1600]

Chromium runs offline with a throw-away profile: no network, no sync, no first-run pages.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from repro import io
from repro.errors import UserError

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page: Path | str, png: Path | str, *, width: int = 1200, height: int = 1600) -> Path:
    """Render `page` at width x height CSS pixels into `png` (written under a temporary name, then renamed)."""
    page, png = Path(page), Path(png)
    chromium = find_chromium()
    if chromium is None:
        raise UserError("no Chromium found; install it (Debian: apt-get install chromium) to take a screenshot")
    if not page.is_file():
        raise UserError(f"{page}: no such report; run `repro report` first")
    # this process's own name (two screenshots of one file never share it), ending in .png: Chromium picks the
    # format from the extension and refuses .tmp
    tmp = Path(f"{io.temp_name(png)}.png")
    try:
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                   f"--window-size={width},{height}", f"--screenshot={tmp.resolve()}",
                                   page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not tmp.exists():
            raise UserError(f"Chromium could not render {page} (exit {proc.returncode}); try it by hand: {chromium} "
                            f"--headless --screenshot {page}")
        tmp.replace(png)
    finally:
        tmp.unlink(missing_ok=True)
    return png


def main() -> None:  # pragma: no cover - a thin wrapper over screenshot()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=1600)
    args = ap.parse_args()
    print(screenshot(args.page, args.png, width=args.width, height=args.height))


if __name__ == "__main__":  # pragma: no cover
    main()
