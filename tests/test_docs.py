"""Docs as tests: every code block of the README and docs/ runs, page by page, in order.

Conventions (see docs/README.md): a page's ``python`` blocks run in one namespace, in a fresh
folder, in order. A block preceded by ``<!-- file: NAME -->`` is written to NAME instead
(a scene script the page then uses). A ``bash`` block preceded by ``<!-- run -->`` runs in
that folder, with the virtual environment's ``bin`` first on PATH; other bash blocks (set-up
commands, long runs) are shown but not run. A block preceded by ``<!-- skip -->`` is not run
(say why in the text). The folder sits beside a link to the shared assets, so
``../shared/assets/...`` paths work as they do from a checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ASSETS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!--\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S
)


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(marker, language, code) of each fenced block of a page."""
    text = page.read_text()
    return [(m["mark"] or "", m["lang"], m["code"]) for m in BLOCK.finditer(text)]


def runnable(page: Path) -> bool:
    return any(
        lang == "python" or (lang == "bash" and mark == "run")
        for mark, lang, _ in blocks(page)
        if mark != "skip"
    )


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: p.name)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if ASSETS.is_dir():
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "assets").symlink_to(ASSETS)
    (work / "scenes").symlink_to(ROOT / "scenes")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    namespace: dict = {"__name__": "__main__"}
    for i, (mark, lang, code) in enumerate(blocks(page)):
        where = f"{page.name} block {i + 1}"
        if mark == "skip":
            continue
        if mark.startswith("file:"):
            (work / mark.split(":", 1)[1].strip()).write_text(code)
        elif lang == "python":
            if "../shared/assets" in code and not ASSETS.is_dir():
                pytest.skip(f"{where} needs {ASSETS}")
            exec(compile(code, where, "exec"), namespace)
        elif lang == "bash" and mark == "run":
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env,
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"
