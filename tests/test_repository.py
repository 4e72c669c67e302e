"""The repository stands on its own: no file refers to working material outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The design notes, the shapes world and the style notes the project started from now live in docs/.
OUTSIDE = re.compile(r"\.\./shared|(^|[^/A-Za-z_])(DESIGN|SHAPES|STYLE)\.md")


def test_no_file_refers_to_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".safetensors", ".gif", ".jpg") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{name}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    offenders = [o for o in offenders if not o.startswith("tests/test_repository.py")]
    assert not offenders, f"refer to files outside the repository (bring what they need into docs/): {offenders}"
