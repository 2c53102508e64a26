"""Contrastive pairs from text every CPython install carries: the standard library, offline.

`repurpose demo` needs BGE-format pairs (docs/study.md: JSONL ``{"query", "pos", "neg"}``) without a network.
Every Python ships real, semantically related text pairs:

- ``doc``:     a docstring's summary  -> the rest of that docstring (stdlib sources, C modules)
- ``sig``:     an object's signature  -> its docstring's summary (objects whose docstring is one paragraph)
- ``topic``:   pydoc topic section title + first sentence -> the rest of the paragraph(s)
  (``pydoc_data.topics``: the language reference that ``help("if")`` prints)
- ``comment``: a source comment block -> the code it describes (code search, CodeSearchNet-style)

Python sources are read with ``ast`` (no import, no side effects, deterministic); the C modules (builtins,
math, itertools, ...) have no source, so a fixed list of them is imported in-process (a failure skips the
module). Directories that distributions split into separate packages (test, idlelib, tkinter, lib2to3,
distutils, ensurepip, ...) and platform-generated files are left out, so one Python version + platform gives
the same pairs everywhere.

Cleaning: ``inspect.cleandoc``, doctest examples dropped, whitespace collapsed, length floors; duplicates
(by case- and punctuation-folded text, of the query or of the positive) keep their first occurrence in a
fixed walk order. The eval split hashes the pair's *group* (the documented object, or the topic section),
so all pairs of one object land in the same split and the split is stable across rebuilds and versions.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

PAIRS_VERSION = 1  # bump when the extraction rules change (it keys the cache in workers/suite/cache.py)

# Split out of CPython by distributions (Debian: libpython3-testsuite, python3-tk, idle, python3-lib2to3,
# python3-distutils, python3-venv), GUI/demo code, or generated per platform: not "in every Python".
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "tkinter",
    "turtledemo", "lib2to3", "distutils", "ensurepip", "lib-dynload", "pydoc_data", "__phello__",
})
EXCLUDED_FILES = frozenset({"antigravity.py", "this.py", "__hello__.py", "turtle.py"})
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")

# C modules that CPython builds on every POSIX platform (Modules/Setup.bootstrap + the stdlib extension
# set); a missing one (a platform without it) is skipped. GUI, terminal and test modules are not listed.
C_MODULES = (
    "builtins", "sys", "math", "cmath", "itertools", "time", "gc", "marshal", "errno", "atexit",
    "faulthandler", "unicodedata", "binascii", "zlib", "array", "select", "mmap", "posix", "pwd", "grp",
    "resource", "fcntl", "termios", "syslog", "pyexpat", "_io", "_json", "_pickle", "_struct", "_datetime",
    "_random", "_bisect", "_heapq", "_operator", "_functools", "_collections", "_csv", "_sre", "_string",
    "_abc", "_codecs", "_weakref", "_warnings", "_stat", "_contextvars", "_statistics", "_queue",
    "_asyncio", "_elementtree", "_socket", "_signal", "_thread", "_tracemalloc", "_locale", "_opcode",
    "_symtable", "_typing", "_zoneinfo", "_lsprof", "_posixsubprocess", "_md5", "_sha1", "_sha256",
    "_sha512", "_sha3", "_blake2",
)

# Length floors (characters, words) and caps; the trainer truncates to 75 tokens (~300 characters) anyway.
MIN_QUERY_CHARS, MIN_QUERY_WORDS = 20, 3
MIN_SUMMARY_CHARS = 12  # a summary that is the positive of a signature: 'Lock the mailbox.'
MIN_POS_CHARS, MIN_POS_WORDS = 40, 6
MAX_QUERY_CHARS, MAX_POS_CHARS = 300, 1000
MAX_SUMMARY_CHARS = 250  # a longer first paragraph is split at its first sentence
CHUNK_CHARS = 120  # a positive takes whole paragraphs until it is at least this long
MAX_CODE_LINES = 12
MIN_CODE_CHARS = 16  # "pass", "continue", "return x" say too little


class PairsError(RuntimeError):
    """The builder produced no usable data (e.g. a Python without its standard library sources)."""


@dataclass(frozen=True)
class Pair:
    query: str
    pos: str
    group: str  # the documented object / topic section: the unit of the train/eval split
    kind: str   # doc | sig | topic | comment


# ---------------------------------------------------------------------------------------------- text


_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`*])")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(?:-+>.*)?$")


def collapse(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _fold(text: str) -> str:
    """The dedupe key: case, punctuation and spacing do not make a different text."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def _drop_doctests(lines: list[str]) -> list[str]:
    """Remove doctest examples: a '>>>' line, its '...' continuations and its output up to a blank line."""
    out, in_example = [], False
    for line in lines:
        s = line.strip()
        if s.startswith(">>>"):
            in_example = True
        elif not s:
            in_example = False
        if not in_example:
            out.append(line)
    return out


def _paragraphs(text: str) -> list[str]:
    lines = _drop_doctests(text.splitlines())
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append(collapse(" ".join(cur)))
            cur = []
    return [p for p in paras if p]


def first_sentence(text: str) -> tuple[str, str]:
    """(first sentence, the rest); the rest is '' when the text is one sentence."""
    parts = _SENTENCE_END.split(text, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else (text, "")


def docstring_paragraphs(doc: str) -> list[str]:
    """A cleaned docstring's paragraphs, doctests dropped; the first is its summary line.

    A long first paragraph, or a one-paragraph docstring, is split after its first sentence, so the
    summary is one sentence and the rest stays text that describes it.
    """
    paras = _paragraphs(doc)
    if paras and (len(paras[0]) > MAX_SUMMARY_CHARS or len(paras) == 1):
        head, tail = first_sentence(paras[0])
        if tail and len(head) >= MIN_QUERY_CHARS:
            paras[:1] = [head, tail]
    return paras


def truncate(text: str, max_chars: int) -> str:
    """Cut at a word boundary."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _ok(text: str, min_chars: int, min_words: int) -> bool:
    return len(text) >= min_chars and len(text.split()) >= min_words


# --------------------------------------------------------------------------------- stdlib sources


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources() -> Iterator[tuple[str, str]]:
    """(module name, path) of the standard library's .py files, in a fixed (sorted) order."""
    root = stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_PREFIXES) and "-" not in d
        )
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn in EXCLUDED_FILES or fn.startswith(EXCLUDED_PREFIXES):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            yield ".".join(rel), os.path.join(dirpath, fn)


def _parse(path: str) -> tuple[ast.Module, str] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning: invalid escape sequences in old modules
            tree = ast.parse(raw)
        return tree, raw.decode("utf-8", errors="replace")
    except (SyntaxError, ValueError, OSError, RecursionError):
        return None


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _walk_defs(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of every class and function, depth first in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFS):
            qual = f"{prefix}{child.name}"
            yield qual, child
            yield from _walk_defs(child, qual + ".")
        elif not isinstance(child, (ast.Lambda, ast.expr)):
            yield from _walk_defs(child, prefix)


def _signature(module: str, qual: str, node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {module}.{qual}" + (f"({bases})" if bases else "")
    args = node.args
    if args.args and args.args[0].arg in ("self", "cls"):
        args = ast.arguments(posonlyargs=args.posonlyargs, args=args.args[1:], vararg=args.vararg,
                             kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults, kwarg=args.kwarg,
                             defaults=args.defaults[-len(args.args) + 1:] if len(args.args) > 1 else [])
    return truncate(f"{module}.{qual}({ast.unparse(args)})", MAX_QUERY_CHARS)


def _py_docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str, str]]:
    """(group, signature, docstring) of the module and each of its classes and functions."""
    doc = ast.get_docstring(tree)
    if doc:
        yield f"py:{module}", f"module {module}", doc
    for qual, node in _walk_defs(tree):
        doc = ast.get_docstring(node)
        if doc:
            yield f"py:{module}:{qual}", _signature(module, qual, node), doc


def _string_lines(tree: ast.Module) -> set[int]:
    """Lines inside multi-line string literals: a '#' there is text, not a comment."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno and node.end_lineno > node.lineno:
            lines.update(range(node.lineno + 1, node.end_lineno + 1))
    return lines


def _def_spans(tree: ast.Module) -> list[tuple[int, int, str]]:
    return [(n.lineno, n.end_lineno or n.lineno, q) for q, n in _walk_defs(tree)]


def _is_code(text: str) -> bool:
    """Commented-out code parses as Python; an English sentence of several words does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


_NOT_CODE = ("#", '"' * 3, "'" * 3, 'r"' + '""')
_DECORATION = re.compile(r"([-=*~#_+])\1{2,}")  # ---- section rules ----
_SKIP_COMMENT = re.compile(r"copyright|license|licence|-\*-|noqa|type:|pragma|fmt:|pylint", re.IGNORECASE)


def _comment_pairs(tree: ast.Module, source: str, module: str) -> Iterator[Pair]:
    """A block of whole-line comments -> the code right below it (up to a blank line or a dedent)."""
    lines = source.splitlines()
    in_string = _string_lines(tree)
    spans = _def_spans(tree)
    i = 0
    while i < len(lines):
        if (i + 1) in in_string or not lines[i].lstrip().startswith("#"):
            i += 1
            continue
        start, indent = i, len(lines[i]) - len(lines[i].lstrip())
        while i < len(lines) and lines[i].lstrip().startswith("#") and (i + 1) not in in_string:
            i += 1
        text = collapse(_DECORATION.sub(" ", " ".join(ln.strip().lstrip("#") for ln in lines[start:i]))).strip("-=*~_+ ")
        code = []
        j = i + 1 if i + 1 < len(lines) and not lines[i].strip() else i  # one blank line may separate them
        for ln in lines[j: j + MAX_CODE_LINES]:
            if not ln.strip() or ln.lstrip().startswith(_NOT_CODE) or len(ln) - len(ln.lstrip()) < indent:
                break  # a blank line, the next comment, a docstring (the doc pairs' text), a dedent
            code.append(ln.strip())
        if (start == 0 or _SKIP_COMMENT.search(text) or not _ok(text, MIN_QUERY_CHARS, MIN_QUERY_WORDS)
                or _is_code(text) or sum(c.isalpha() or c == " " for c in text) < 0.7 * len(text)):
            continue
        code_text = collapse(" ".join(code))
        if len(code_text) < MIN_CODE_CHARS:
            continue
        enclosing = [q for a, b, q in spans if a <= start + 1 <= b]
        group = f"py:{module}:{enclosing[-1]}" if enclosing else f"py:{module}"
        yield Pair(truncate(text, MAX_QUERY_CHARS), truncate(code_text, MAX_POS_CHARS), group, "comment")


# ------------------------------------------------------------------------------------------ C modules


def _import_quietly(name: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # a module this platform lacks: skip it
        return None


def _c_signature(qualname: str, obj) -> str:
    sig = getattr(obj, "__text_signature__", None)
    if sig:
        sig = re.sub(r"^\(\$\w+,?\s*", "(", sig).replace(", /", "").replace("(/, ", "(").replace("(/)", "()")
        return f"{qualname}{sig}"
    return qualname


def _c_docstrings() -> Iterator[tuple[str, str, str]]:
    """(group, signature, docstring) of the C modules' functions, classes and their methods/attributes."""
    seen: set[int] = set()
    for mod_name in C_MODULES:
        mod = _import_quietly(mod_name)
        if mod is None:
            continue
        if isinstance(mod.__doc__, str):
            yield f"c:{mod_name}", f"module {mod_name}", mod.__doc__
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("__") or id(obj) in seen or not (callable(obj) or inspect.isclass(obj)):
                continue
            seen.add(id(obj))
            qual = f"{mod_name}.{name}"
            if isinstance(getattr(obj, "__doc__", None), str):
                kind = "class " if inspect.isclass(obj) else ""
                yield f"c:{qual}", kind + _c_signature(qual, obj), obj.__doc__
            if not inspect.isclass(obj):
                continue
            for attr, member in sorted(vars(obj).items()):
                if attr in ("__doc__", "__module__") or id(member) in seen:
                    continue
                seen.add(id(member))
                doc = getattr(member, "__doc__", None)
                if isinstance(doc, str) and doc is not getattr(type(member), "__doc__", None):
                    yield f"c:{qual}.{attr}", _c_signature(f"{qual}.{attr}", member), doc


def _c_clean(signature: str, doc: str) -> tuple[str, str]:
    """Old-style C docstrings open with their signature ('chain(*iterables) --> chain object'): move it."""
    doc = inspect.cleandoc(doc)
    first, _, rest = doc.partition("\n")
    if _SIGNATURE_LINE.match(first.strip()):
        if "(" not in signature:
            signature = (signature.rsplit(".", 1)[0] + "." if "." in signature else "") + first.strip()
        doc = rest.lstrip("-\n ")
    return signature, doc


# --------------------------------------------------------------------------------------- pydoc topics


_UNDERLINE = re.compile(r"^([*=\-~^\"])\1{2,}$")


def _topic_sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(section title, its paragraphs); a title is a line underlined with *, =, - or ~."""
    lines = text.splitlines()
    title, body = "", []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and lines[i].strip() and _UNDERLINE.match(lines[i + 1].strip()):
            if body:
                yield title, body
            title, body = lines[i].strip(), []
            i += 2
            continue
        body.append(lines[i])
        i += 1
    if body:
        yield title, body


def _chunk_pairs(paras: list[str], group: str, kind: str, prefix: str = "", whole_first: bool = False
                 ) -> Iterator[Pair]:
    """Non-overlapping (lead sentence -> the text after it) pairs over a document's paragraphs.

    Each pair starts at a paragraph: its first sentence (or, with ``whole_first``, the whole first
    paragraph: a docstring's summary) is the query; the rest of the paragraph, extended by the following
    paragraphs until it reaches CHUNK_CHARS, is the positive. ``prefix`` names the document (a topic
    section, a documented object) so a query like "It returns ..." still says what "it" is.
    """
    i = 0
    while i < len(paras):
        head, tail = (paras[i], "") if whole_first and i == 0 else first_sentence(paras[i])
        i += 1
        if not (_ok(head, MIN_QUERY_CHARS, MIN_QUERY_WORDS) or _SIGNATURE_LINE.match(head)):
            continue  # a label ("Note:", "2."): the next paragraph starts the next pair
        while i < len(paras) and len(tail) < CHUNK_CHARS:
            tail = collapse(tail + " " + paras[i])
            i += 1
        if _ok(tail, MIN_POS_CHARS, MIN_POS_WORDS):
            query = f"{prefix}: {head}" if prefix else head
            yield Pair(truncate(query, MAX_QUERY_CHARS), truncate(tail, MAX_POS_CHARS), group, kind)


def _topic_pairs() -> Iterator[Pair]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        for title, body in _topic_sections(topics[key]):
            yield from _chunk_pairs(_paragraphs("\n".join(body)), f"topic:{key}:{title}", "topic", prefix=title)


# -------------------------------------------------------------------------------------------- pairs


def _docstring_pairs(group: str, signature: str, doc: str) -> Iterator[Pair]:
    """summary -> what follows it (then later paragraphs -> theirs); a docstring of one short paragraph
    gives signature -> summary instead."""
    paras = docstring_paragraphs(inspect.cleandoc(doc))
    if not paras:
        return
    name = signature.split("(", 1)[0].removeprefix("class ").removeprefix("module ")
    doc_pairs = list(_chunk_pairs(paras, group, "doc", whole_first=True))
    for j, p in enumerate(doc_pairs):  # later chunks' queries name the object they are about
        yield p if j == 0 else Pair(truncate(f"{name}: {p.query}", MAX_QUERY_CHARS), p.pos, group, "doc")
    if not doc_pairs and _ok(paras[0], MIN_SUMMARY_CHARS, MIN_QUERY_WORDS):
        yield Pair(truncate(collapse(signature), MAX_QUERY_CHARS), truncate(" ".join(paras), MAX_POS_CHARS), group, "sig")


def iter_pairs() -> Iterator[Pair]:
    """Every candidate pair, deduplicated, in a fixed order: stdlib sources, C modules, topics."""
    seen: set[str] = set()

    def fresh(p: Pair) -> bool:
        q, d = _fold(p.query), _fold(p.pos)
        if not q or not d or q == d or q in seen or d in seen:
            return False
        seen.update((q, d))
        return True

    for module, path in stdlib_sources():
        parsed = _parse(path)
        if parsed is None:
            continue
        tree, source = parsed
        for group, sig, doc in _py_docstrings(tree, module):
            yield from filter(fresh, _docstring_pairs(group, sig, doc))
        yield from filter(fresh, _comment_pairs(tree, source, module))
    for group, sig, doc in _c_docstrings():
        sig, doc = _c_clean(sig, doc)
        yield from filter(fresh, _docstring_pairs(group, sig, doc))
    yield from filter(fresh, _topic_pairs())


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) (sha1, not Python's salted hash())."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / 16**12


def split_pairs(pairs: list[Pair], eval_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) by the hash of each pair's group; each list ordered by the hash of its query (shuffled,
    but the same on every build)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train = [p for p in pairs if _unit_hash(p.group) >= eval_fraction]
    held = [p for p in pairs if _unit_hash(p.group) < eval_fraction]
    key = lambda p: hashlib.sha1(p.query.encode()).hexdigest()  # noqa: E731
    return sorted(train, key=key), sorted(held, key=key)


def _write_jsonl(path: str, pairs: list[Pair]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"query": p.query, "pos": [p.pos], "neg": []}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_pairs(out_dir: str, eval_fraction: float = 0.05) -> dict:
    """Write ``train.jsonl`` and ``eval.jsonl`` (BGE format) and ``pairs.json`` (counts) under ``out_dir``.

    Returns {"train": path, "eval": path, "n_train", "n_eval", "kinds": {kind: count}, "python": version}.
    """
    pairs = list(iter_pairs())
    if not pairs:
        raise PairsError(f"no pairs: no standard library sources under {stdlib_dir()}")
    train, held = split_pairs(pairs, eval_fraction)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.jsonl")}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["eval"], held)
    info = {
        **paths, "n_train": len(train), "n_eval": len(held), "kinds": dict(sorted(Counter(p.kind for p in pairs).items())),
        "python": sys.version.split()[0], "eval_fraction": eval_fraction, "pairs_version": PAIRS_VERSION,
    }
    with open(os.path.join(out_dir, "pairs.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------------------------------- corpus


def iter_corpus_texts(source: bool = True) -> Iterator[str]:
    """Raw text for tokenizer training and LM pretraining, in a fixed order: the pydoc topics, the C
    modules' docstrings, then (``source=True``) each stdlib source file whole (code, comments and
    docstrings), else only the sources' docstrings."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    for _, _, doc in _c_docstrings():
        yield inspect.cleandoc(doc)
    for module, path in stdlib_sources():
        if source:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
            continue
        parsed = _parse(path)
        if parsed is not None:
            for _, _, doc in _py_docstrings(parsed[0], module):
                yield doc
