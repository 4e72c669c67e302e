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


def test_the_sampler_lists_written_out_name_every_sampler():
    """The proto's comment, the CLI's help, the README and docs/engine.md write the sampler names out (the client
    and the proto cannot import services/common/rules.py): each names every one of rules.SAMPLERS."""
    from services.common.rules import SAMPLERS

    places = {
        "proto/latentd/v1/latentd.proto": "Sampler:",
        "client/latentd_client/cli.py": '"--sampler"',
        "README.md": "A request picks its",
        "docs/engine.md": "## Samplers",
    }
    for name, anchor in places.items():
        text = (ROOT / name).read_text()
        assert anchor in text, (name, anchor)
        passage = text[text.index(anchor) :]
        # a Markdown section ends at the next heading of its level; elsewhere the list is within a few lines
        end = passage.find("\n## ", 1) if anchor.startswith("## ") else 6000
        passage = passage if end < 0 else passage[:end]
        missing = [s for s in SAMPLERS if not re.search(rf"\b{s}\b", passage)]
        assert not missing, f"{name} does not name {missing} near {anchor!r}"
