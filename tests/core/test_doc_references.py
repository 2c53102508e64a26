"""The grids' comments and the docs point only at files that are in the repository: a reader who follows a
reference finds it (the grids once sent readers to a paper summary that never shipped)."""
from __future__ import annotations

import glob
import os
import re

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCANNED = ("grids/*.yaml", "docs/*.md", "README.md")
# a path-like word ending in a file extension: core/models.py, grids/paper.yaml, README.md, deploy/*.yaml
REFERENCE = re.compile(r"[A-Za-z0-9_.*/-]+\.(?:md|py|ya?ml|json|toml|txt|sh|cfg)\b")
# a document named in capitals (README.md, CHANGELOG.md): the repository's own, wherever it is written
DOCUMENT = re.compile(r"^[A-Z][A-Z0-9_-]*\.md$")


def repository_references(text: str) -> list[str]:
    """The references in ``text`` that name the repository's files: a path under one of its top-level folders (or
    under a folder no clone has, such as shared/), or a document named in capitals. Files a command writes
    (recipe.md, summary.json) or a user provides (train.jsonl, my-grid.yaml) are neither."""
    top = {name for name in os.listdir(REPO) if os.path.isdir(os.path.join(REPO, name))} | {"shared"}
    found = []
    for ref in REFERENCE.findall(text):
        ref = ref.removeprefix("./")
        if ("/" in ref and ref.split("/", 1)[0] in top) or DOCUMENT.match(ref):
            found.append(ref)
    return found


def exists(ref: str, where: str) -> bool:
    """A path from the repository's root (a glob may match), or a capitalised document at the root, in docs/ or
    beside the file that names it."""
    if "/" in ref:
        return bool(glob.glob(os.path.join(REPO, ref)))
    return any(os.path.isfile(os.path.join(d, ref)) for d in (REPO, os.path.join(REPO, "docs"), os.path.dirname(where)))


def test_grids_and_docs_reference_only_files_in_the_repository():
    files = sorted(f for pattern in SCANNED for f in glob.glob(os.path.join(REPO, pattern)))
    assert any(f.endswith("paper.yaml") for f in files) and any(f.endswith("reference.md") for f in files)
    missing, seen = [], 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                for ref in repository_references(line):
                    seen += 1
                    if not exists(ref, path):
                        missing.append(f"{os.path.relpath(path, REPO)}:{number}: {ref}")
    assert seen >= 10  # the scan finds the references there are (core/models.py, grids/paper.yaml, ...)
    assert not missing, "references to files not in the repository:\n" + "\n".join(missing)


def test_the_scan_catches_a_missing_file():
    refs = repository_references('the paper\'s grid (docs/study.md "Grid"); shapes: core/models.py; out: recipe.md, '
                                 "shared/docs/reference.md and my-grid.yaml")
    assert refs == ["docs/study.md", "core/models.py", "shared/docs/reference.md"]
    where = os.path.join(REPO, "grids", "paper.yaml")
    assert [exists(r, where) for r in refs] == [False, True, False]
