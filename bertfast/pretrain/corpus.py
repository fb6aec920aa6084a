"""Pretraining corpora: documents made of sentences, read from text / JSON-lines files or harvested
from the docstrings of the running interpreter's standard library (the default corpus).

Formats read by ``read_corpus``:

- ``.txt`` (any suffix but ``.jsonl``): UTF-8 text; one or more blank lines end a document; each
  document's text is cut into sentences by ``split_sentences``.
- ``.jsonl``: one JSON object per line; its ``text_field`` (default ``"text"``) string is one document.
- a folder: every ``*.txt`` and ``*.jsonl`` file below it, in the order of their relative POSIX paths.

Bytes are decoded line by line as strict UTF-8 (a leading BOM is dropped), so one bad line costs
that line only; whatever is skipped is counted in ``Corpus.skipped`` by reason.

This module uses only the standard library: the stdlib harvest runs it as a script in worker
processes (``python -I -S corpus.py --stdlib-worker ROOT INDEX COUNT``), which keeps the workers
free of torch and of the package's own imports.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Corpus", "read_corpus", "split_sentences", "stdlib_docstrings"]


@dataclass
class Corpus:
    """Documents of sentences.

    documents: each document is a list of non-empty, stripped sentences (whitespace runs collapsed).
    source: what the corpus is, for humans (a path, or the interpreter whose stdlib was harvested).
    skipped: reason -> count of things left out (lines, files, docstrings).
    """

    documents: list[list[str]]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_characters(self) -> int:
        """Sum of len(sentence) over all sentences."""
        return sum(len(s) for doc in self.documents for s in doc)

    @property
    def num_sentences(self) -> int:
        return sum(len(doc) for doc in self.documents)

    def texts(self) -> Iterator[str]:
        """Every sentence, document by document, in order (what tokenizers are trained on)."""
        for doc in self.documents:
            yield from doc


# --- sentences -------------------------------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
# Sentence end: . ! or ? (then any closing quotes/brackets), whitespace, and a capital letter, digit,
# opening quote or bracket. Applied after whitespace normalization.
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*\s+(?=["'(\[A-Z0-9])""")
# Lower-cased words (without the final period) after which a period does not end a sentence.
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "cf", "vs", "viz", "al", "mr", "mrs", "ms", "dr", "prof",
                            "jr", "sr"})


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: non-empty, stripped, with every whitespace run collapsed to one space.

    Paragraphs (separated by blank lines) never share a sentence. Inside a paragraph, a sentence ends
    at ``.``, ``!`` or ``?`` (plus any closing quotes/brackets) followed by whitespace and then an
    uppercase letter, a digit, a quote or an opening bracket. A period does not end a sentence after a
    common abbreviation (e.g., i.e., etc., cf., vs., Mr., Dr., ...) or a single capital initial ("J.").
    Numbers such as 3.14 are never cut, since no whitespace follows their period.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    sentences = []
    for paragraph in _BLANK_LINE.split(text.replace("\r\n", "\n").replace("\r", "\n")):
        paragraph = " ".join(paragraph.split())
        start = 0
        for m in _SENTENCE_END.finditer(paragraph):
            if paragraph[m.start()] == "." and _is_abbreviation(paragraph, m.start()):
                continue
            piece = paragraph[start:m.end()].strip()
            if piece:
                sentences.append(piece)
            start = m.end()
        piece = paragraph[start:].strip()
        if piece:
            sentences.append(piece)
    return sentences


def _is_abbreviation(paragraph: str, dot: int) -> bool:
    """Is the word that ends with the period at ``dot`` an abbreviation or a capital initial?"""
    word = paragraph[paragraph.rfind(" ", 0, dot) + 1:dot].lstrip("\"'([")
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())


# --- reading files ---------------------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"


def read_corpus(path: str | os.PathLike | None, text_field: str = "text") -> Corpus:
    """The corpus at ``path`` (see the module docstring for the formats); None -> ``stdlib_docstrings()``.

    Documents without any sentence are dropped silently. Raises FileNotFoundError for a missing path,
    ValueError for a folder without .txt/.jsonl files or a corpus without a single sentence.
    """
    if path is None:
        return stdlib_docstrings()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"corpus: expected a path or None, got {type(path).__name__}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field: expected a non-empty str, got {text_field!r}")
    root = Path(os.fspath(path))
    if not root.exists():
        raise FileNotFoundError(f"corpus: {root} does not exist")
    skipped: Counter[str] = Counter()
    if root.is_dir():
        files = _corpus_files(root)
        if not files:
            raise ValueError(f"corpus: the folder {root} holds no .txt or .jsonl file")
        source = f"{root} ({len(files)} files)"
    else:
        files, source = [root], str(root)
    documents: list[list[str]] = []
    for file in files:
        documents.extend(_read_file(file, text_field, skipped))
    if not documents:
        raise ValueError(f"corpus: {root} holds no text (skipped: {dict(skipped)})")
    return Corpus(documents, source, dict(skipped))


def _corpus_files(root: Path) -> list[Path]:
    """Every .txt / .jsonl file below ``root`` (symlinked folders are not followed), sorted by relative
    POSIX path."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith((".txt", ".jsonl")):
                file = Path(folder, name)
                found.append((file.relative_to(root).as_posix(), file))
    return [file for _, file in sorted(found)]


def _read_file(file: Path, text_field: str, skipped: Counter) -> list[list[str]]:
    """The documents of one file, counting what is skipped into ``skipped``."""
    try:
        data = file.read_bytes()
    except OSError:
        skipped["unreadable file"] += 1
        return []
    data = data.removeprefix(_BOM)
    if not data.strip():
        skipped["empty file"] += 1
        return []
    lines = []
    for raw in data.splitlines():  # bytes.splitlines cuts at \n, \r\n and \r only
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped["undecodable line"] += 1
    if file.suffix.lower() == ".jsonl":
        texts = _jsonl_texts(lines, text_field, skipped)
    else:
        texts = _text_documents(lines)
    return [doc for doc in map(split_sentences, texts) if doc]


def _text_documents(lines: list[str]) -> list[str]:
    """Groups of consecutive non-blank lines, joined by newlines."""
    documents, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _jsonl_texts(lines: list[str], text_field: str, skipped: Counter) -> list[str]:
    """The ``text_field`` string of every JSON-object line; blank lines are ignored."""
    texts = []
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            skipped["invalid JSON line"] += 1
            continue
        if not isinstance(obj, dict):
            skipped["JSON line not an object"] += 1
        elif text_field not in obj:
            skipped["missing text field"] += 1
        elif not isinstance(obj[text_field], str):
            skipped["non-string text field"] += 1
        else:
            texts.append(obj[text_field])
    return texts


# --- the standard library's docstrings ------------------------------------------------------------

# Bump when the harvest rules change: old cache files then no longer match.
_HARVEST_VERSION = 1
_SKIP_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                           "lib-dynload",
                           "encodings"})  # ~100 generated codec modules with the same boilerplate docstring
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_LISTS = ("body", "handlers", "orelse", "finalbody", "cases")


def stdlib_docstrings() -> Corpus:
    """The default corpus: the English docstrings of the running interpreter's standard library.

    Source files under ``sysconfig.get_paths()["stdlib"]`` are parsed with ``ast`` (nothing is
    imported, so no module's code runs), in sorted order of their relative paths. Skipped: folders
    named site-packages, dist-packages, __pycache__, test, tests, idle_test, lib-dynload, config-*,
    and encodings (generated codecs). One document per file: the docstrings of its module, classes
    and functions in file order, each cut by ``split_sentences``. In a docstring, doctest examples
    (a ``>>>`` line up to the next blank line) and lines starting with ``...`` are dropped; a docstring
    that is mostly such lines ("code docstring") or mostly non-ASCII ("non-ASCII docstring") is
    dropped whole, and counted in ``skipped``.

    Parsing runs in worker processes; the result is cached under ``$XDG_CACHE_HOME/bertfast`` (or
    ``~/.cache/bertfast``), keyed by the interpreter and the stdlib path. An unreadable cache is
    ignored; a cache that cannot be written is not an error.
    """
    root = sysconfig.get_paths()["stdlib"]
    key = [_HARVEST_VERSION, sys.version, sys.implementation.cache_tag, os.path.abspath(root)]
    cache = _cache_file(key)
    cached = _read_cache(cache, key) if cache is not None else None
    if cached is not None:
        return cached
    files = _stdlib_files(root)
    results = _harvest_parallel(root, len(files))
    documents, skipped = [], Counter()
    for sentences, reasons in results:
        if sentences:
            documents.append(sentences)
        skipped.update(reasons)
    version = ".".join(map(str, sys.version_info[:3]))
    corpus = Corpus(documents, f"Python {version} standard library docstrings ({len(documents)} files)",
                    dict(sorted(skipped.items())))
    if cache is not None:
        _write_cache(cache, key, corpus)
    return corpus


def _stdlib_files(root: str) -> list[str]:
    """Relative POSIX paths of the stdlib's harvested ``.py`` files, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_FOLDERS and not d.startswith("config-")]
        rel = Path(folder).relative_to(root)
        found.extend((rel / n).as_posix() for n in names if n.endswith(".py"))
    return sorted(found)


def _file_docstrings(path: str) -> tuple[list[str], dict[str, int]]:
    """Sentences of one source file's kept docstrings (in file order), and what was skipped."""
    skipped: Counter[str] = Counter()
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())  # bytes: ast honours the file's coding cookie
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        skipped["unparsable file"] += 1
        return [], dict(skipped)
    sentences = []
    for doc in _docstrings(tree):
        text, reason = _clean_docstring(doc)
        if reason:
            skipped[reason] += 1
        else:
            sentences.extend(split_sentences(text))
    return sentences, dict(skipped)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of the module / class / function nodes below ``node``, depth first in source order."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        # Docstrings live in statement lists only: skipping expressions makes the walk ~10x faster.
        children = []
        for name in _STATEMENT_LISTS:
            for child in getattr(node, name, ()):
                children.extend(child.body if isinstance(child, (ast.ExceptHandler, ast.match_case)) else (child,))
        stack.extend(reversed(children))


def _clean_docstring(doc: str) -> tuple[str, str | None]:
    """(prose, None), or ("", reason) for a docstring to drop. Doctest blocks and ``...`` lines go."""
    kept, code, prose, in_example = [], 0, 0, False
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith(">>>"):
            in_example = True
        elif not s:
            in_example = False
        if in_example or s.startswith("..."):
            code += 1
            continue
        kept.append(line)
        prose += bool(s)
    if code > prose:
        return "", "code docstring"
    text = "\n".join(kept)
    letters = [c for c in text if not c.isspace()]
    if 2 * sum(not c.isascii() for c in letters) > len(letters):
        return "", "non-ASCII docstring"
    return text, None


def _harvest_serial(root: str, files: list[str]) -> list[tuple[list[str], dict[str, int]]]:
    return [_file_docstrings(os.path.join(root, f)) for f in files]


def _harvest_parallel(root: str, count: int) -> list[tuple[list[str], dict[str, int]]]:
    """Every file's (sentences, skipped), in file order, parsed by worker processes (clean ``python -I
    -S`` interpreters running this file); serially here when a worker cannot run."""
    workers = max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                         (os.cpu_count() or 1)))
    try:
        if not sys.executable:
            raise OSError("no interpreter path")
        with ThreadPoolExecutor(workers) as pool:  # threads only wait on the processes
            parts = list(pool.map(lambda w: _run_worker(root, w, workers), range(workers)))
        results: list = [None] * count
        for w, part in enumerate(parts):
            indices = range(w, count, workers)
            if len(part) != len(indices):
                raise ValueError("worker returned the wrong number of files")
            for i, (sentences, reasons) in zip(indices, part):
                results[i] = (sentences, reasons)
        return results
    except (OSError, ValueError, subprocess.SubprocessError):
        return _harvest_serial(root, _stdlib_files(root))


def _run_worker(root: str, index: int, count: int) -> list:
    """One worker's results for files index, index + count, ... as decoded JSON."""
    done = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), "--stdlib-worker", root,
                           str(index), str(count)], capture_output=True, timeout=600, check=True)
    return json.loads(done.stdout)


def _worker_main(argv: list[str]) -> int:
    """``--stdlib-worker ROOT INDEX COUNT``: JSON list of [sentences, skipped] for every COUNT-th file."""
    root, index, count = argv[0], int(argv[1]), int(argv[2])
    files = _stdlib_files(root)[index::count]
    json.dump(_harvest_serial(root, files), sys.stdout)
    return 0


# --- cache -----------------------------------------------------------------------------------------

def _cache_file(key: list) -> Path | None:
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: relative values are ignored
        try:
            base = os.path.join(os.path.expanduser("~"), ".cache")
        except (KeyError, RuntimeError):
            return None
        if not os.path.isabs(base):
            return None
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path(base, "bertfast", f"stdlib_docstrings-{digest}.json")


def _read_cache(file: Path, key: list) -> Corpus | None:
    """The cached corpus, or None when the file is missing, unreadable, stale or malformed."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data["key"] != key:
            return None
        documents, source, skipped = data["documents"], data["source"], data["skipped"]
        ok = (isinstance(documents, list) and isinstance(source, str) and isinstance(skipped, dict)
              and all(isinstance(d, list) and d and all(isinstance(s, str) and s for s in d) for d in documents)
              and all(isinstance(v, int) for v in skipped.values()))
        return Corpus(documents, source, skipped) if ok and documents else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _write_cache(file: Path, key: list, corpus: Corpus) -> None:
    """Write atomically (temp file + os.replace); failing to write only loses the cache."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "source": corpus.source, "skipped": corpus.skipped,
                       "documents": corpus.documents}, f, ensure_ascii=False)
        os.replace(tmp, file)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


if __name__ == "__main__" and sys.argv[1:2] == ["--stdlib-worker"]:
    sys.exit(_worker_main(sys.argv[2:]))
