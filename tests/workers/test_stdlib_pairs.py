"""The stdlib pairs builder: deterministic, valid BGE JSONL, a disjoint eval split, thousands of pairs."""
from __future__ import annotations

import json

import pytest

from workers.suite import stdlib_pairs as P


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("pairs_a"), tmp_path_factory.mktemp("pairs_b")
    return P.build_pairs(str(a)), P.build_pairs(str(b))


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # walks the whole standard library
def test_two_builds_write_identical_files(two_builds):
    a, b = two_builds
    for split in ("train", "eval"):
        with open(a[split], "rb") as fa, open(b[split], "rb") as fb:
            assert fa.read() == fb.read(), split
    assert {k: v for k, v in a.items() if k not in ("train", "eval")} == \
           {k: v for k, v in b.items() if k not in ("train", "eval")}


@pytest.mark.slow  # walks the whole standard library
def test_files_are_bge_jsonl_with_a_disjoint_eval_split(two_builds):
    info = two_builds[0]
    train, held = _rows(info["train"]), _rows(info["eval"])
    assert (len(train), len(held)) == (info["n_train"], info["n_eval"])
    assert len(train) + len(held) >= 5000
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.10  # eval_fraction 0.05, split by group hash
    for row in train + held:
        assert set(row) == {"query", "pos", "neg"}
        assert isinstance(row["query"], str) and row["query"].strip()
        assert len(row["pos"]) == 1 and isinstance(row["pos"][0], str) and row["pos"][0].strip()
        assert row["neg"] == []
        assert row["query"] == " ".join(row["query"].split())  # whitespace collapsed
    texts = lambda rows: {r["query"] for r in rows} | {r["pos"][0] for r in rows}  # noqa: E731
    assert not texts(train) & texts(held)
    assert len({r["query"] for r in train}) == len(train)  # deduplicated
    assert set(info["kinds"]) == {"doc", "sig", "topic", "comment"}
    assert sum(info["kinds"].values()) == len(train) + len(held)


@pytest.mark.slow  # walks the whole standard library
def test_no_doctest_survives(two_builds):
    for row in _rows(two_builds[0]["train"]):
        assert ">>>" not in row["query"] and ">>>" not in row["pos"][0]


def test_docstring_paragraphs_drop_doctests_and_split_the_summary():
    doc = "Add two numbers.\n\n>>> add(1, 2)\n3\n\nBoth arguments must be numbers; the result is their sum."
    assert P.docstring_paragraphs(doc) == ["Add two numbers.", "Both arguments must be numbers; the result is their sum."]
    one = "Return the sum of x and y. Raises TypeError when either is not a number."
    assert P.docstring_paragraphs(one) == ["Return the sum of x and y.", "Raises TypeError when either is not a number."]


def test_docstring_pairs_summary_to_rest_else_signature_to_summary():
    doc = "Copy data from src to dst.\n\nIf follow_symlinks is false and src is a symbolic link, a new symlink is made."
    (pair,) = P._docstring_pairs("py:shutil:copyfile", "shutil.copyfile(src, dst)", doc)
    assert (pair.kind, pair.query) == ("doc", "Copy data from src to dst.")
    assert pair.pos.startswith("If follow_symlinks")
    (sig,) = P._docstring_pairs("py:os:x", "mailbox.Maildir.lock()", "Lock the mailbox.")
    assert (sig.kind, sig.query, sig.pos) == ("sig", "mailbox.Maildir.lock()", "Lock the mailbox.")


def test_split_is_by_group_and_validated():
    pairs = [P.Pair(f"query number {i} here", f"positive text number {i}", f"g{i % 7}", "doc") for i in range(700)]
    train, held = P.split_pairs(pairs, 0.3)
    assert len(train) + len(held) == 700
    assert not {p.group for p in train} & {p.group for p in held}
    assert P.split_pairs(pairs, 0.3) == (train, held)
    with pytest.raises(ValueError, match="eval_fraction"):
        P.split_pairs(pairs, 1.0)


@pytest.mark.slow  # walks the whole standard library
def test_corpus_has_topics_docstrings_and_source():
    texts = list(P.iter_corpus_texts())
    joined = "\n".join(texts[:200])
    assert 'The "if" statement' in joined  # pydoc topics first
    assert any(t.startswith('"""') or "def " in t for t in texts[-50:])  # whole source files at the end
    assert sum(map(len, texts)) > 1_000_000
