"""The repository stands on its own: no file refers to working material outside it."""

from __future__ import annotations

import ast
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


def test_services_never_import_the_client_package():
    """The doors share the core; the client imports the services' protobuf conversions, never the reverse."""
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "grpc_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "client" or n.startswith("client.")]
    assert not offenders, offenders
