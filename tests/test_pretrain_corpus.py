"""bertfast.pretrain.corpus: the stdlib docstring harvest (deterministic, cached, imports nothing),
sentence splitting, and reading .txt / .jsonl / folder corpora with every skip counted."""

from __future__ import annotations

import json
import random
import sys
import sysconfig

import pytest

from bertfast.pretrain import corpus as C
from bertfast.pretrain.corpus import (
    Corpus,
    read_corpus,
    split_sentences,
    stdlib_docstrings,
)

# Modules whose import has visible effects (a browser, a printed poem, a window) or that are big.
SIDE_EFFECT_MODULES = ("antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib", "__hello__",
                       "__phello__")


@pytest.fixture(scope="module")
def harvest(tmp_path_factory):
    """One cold harvest (empty cache) and one warm one, recording what the cold one did."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("XDG_CACHE_HOME", str(cache))
        record = {"serial_calls": 0}
        parallel, serial = C._harvest_parallel, C._harvest_serial

        def parallel_spy(root, count):
            record["parallel"] = parallel(root, count)
            return record["parallel"]

        def serial_spy(root, files):
            record["serial_calls"] += 1
            return serial(root, files)

        mp.setattr(C, "_harvest_parallel", parallel_spy)
        mp.setattr(C, "_harvest_serial", serial_spy)
        before = set(sys.modules)
        cold = stdlib_docstrings()
        record["gained"] = set(sys.modules) - before
        record["cache_files"] = list(cache.glob("bertfast/*.json"))
        warm = stdlib_docstrings()
    return cold, warm, record


def test_stdlib_harvest_deterministic_and_cached(harvest):
    cold, warm, record = harvest
    assert record["serial_calls"] == 0, "the worker processes failed: the harvest fell back to serial parsing"
    assert len(record["cache_files"]) == 1
    assert warm == cold
    # The workers' interleaved results, put back in file order, equal a serial in-process parse.
    root = sysconfig.get_paths()["stdlib"]
    files = C._stdlib_files(root)
    assert len(record["parallel"]) == len(files)
    assert [list(map(list, r)) for r in record["parallel"][:40]] == \
        [list(map(list, r)) for r in C._harvest_serial(root, files[:40])]


def test_stdlib_harvest_content(harvest):
    cold, _, _ = harvest
    assert cold.source.startswith(f"Python {sys.version_info.major}.{sys.version_info.minor}.")
    assert f"({len(cold.documents)} files)" in cold.source
    assert 300 < len(cold.documents) < 1500
    assert 1_000_000 < cold.num_characters < 3_000_000  # about 1.6M on CPython 3.11
    assert cold.num_sentences == sum(1 for _ in cold.texts())
    for doc in cold.documents:
        assert doc and all(s and s == s.strip() and "  " not in s and "\n" not in s for s in doc)
    assert not any(s.startswith((">>>", "...")) for s in cold.texts())
    assert cold.skipped.get("code docstring", 0) > 0  # the doctest-heavy ones (e.g. _pydecimal) go
    assert "Text wrapping and filling." in set(cold.texts())  # textwrap's module docstring
    assert not any(s.startswith("Python Character Mapping Codec") for s in cold.texts())  # encodings/ skipped


def test_stdlib_harvest_imports_nothing(harvest):
    _, _, record = harvest
    gained = record["gained"]
    assert not gained & set(SIDE_EFFECT_MODULES)
    assert not any(m.startswith(("test.", "idlelib.", "tkinter.", "lib2to3.")) for m in gained)


def test_side_effect_files_parsed_in_process_import_nothing(capfd):
    root = sysconfig.get_paths()["stdlib"]
    files = [f for f in ("antigravity.py", "this.py", "turtle.py") if f in C._stdlib_files(root)]
    before = set(sys.modules)
    results = C._harvest_serial(root, files)
    assert not (set(sys.modules) - before) & set(SIDE_EFFECT_MODULES)
    assert capfd.readouterr().out == ""  # `import this` would print the Zen of Python
    if "turtle.py" in files:
        assert results[files.index("turtle.py")][0]  # turtle.py is well documented


def test_clean_docstring_drops_doctests():
    doc = ("Add numbers.\n\nThe sum is returned\nas an int or a float.\nEither may be negative.\n\n"
           ">>> add(1, 2)\n3\n\nMore prose here.\n... and a stray line")
    text, reason = C._clean_docstring(doc)
    assert reason is None
    assert split_sentences(text) == ["Add numbers.", "The sum is returned as an int or a float.",
                                     "Either may be negative.", "More prose here."]
    assert C._clean_docstring(">>> f()\n1\n>>> g()\n2\nNote.")[1] == "code docstring"
    assert C._clean_docstring("\u00e9\u00e8\u00ea\u00eb \u00e0\u00e2 x")[1] == "non-ASCII docstring"
    assert C._clean_docstring("Caf\u00e9 is a French word.")[1] is None


def test_cache_ignored_when_unreadable_or_stale(tmp_path):
    key = [C._HARVEST_VERSION, "python", "tag", "/lib"]
    file = tmp_path / "c.json"
    assert C._read_cache(file, key) is None  # missing
    file.write_bytes(b"\xff\x00 not json")
    assert C._read_cache(file, key) is None
    corpus = Corpus([["One.", "Two."], ["Three."]], "src", {"x": 1})
    C._write_cache(file, key, corpus)
    assert C._read_cache(file, key) == corpus
    assert C._read_cache(file, [*key[:-1], "/other"]) is None
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left
    data = json.loads(file.read_text())
    data["documents"] = [["ok"], [3]]
    file.write_text(json.dumps(data))
    assert C._read_cache(file, key) is None


def test_cache_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert C._cache_file([1]).parent == tmp_path / "bertfast"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert C._cache_file([1]).parent == tmp_path / "home" / ".cache" / "bertfast"
    assert C._cache_file([1]) != C._cache_file([2])


# --- split_sentences ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("One sentence. Another one.", ["One sentence.", "Another one."]),
    ("Really? Yes! Fine.", ["Really?", "Yes!", "Fine."]),
    ("Use e.g. this one. Or i.e. that. Also etc. Then more.", ["Use e.g. this one.", "Or i.e. that.",
                                                               "Also etc. Then more."]),
    ("Mr. Smith met J. Doe. They talked. Dr. Who vs. Daleks.", ["Mr. Smith met J. Doe.", "They talked.",
                                                                "Dr. Who vs. Daleks."]),
    ("Pi is 3.14 or so. 2.5 is less.", ["Pi is 3.14 or so.", "2.5 is less."]),
    ("Call foo. bar is lowercase.", ["Call foo. bar is lowercase."]),
    ('He said "stop." Then left. (See below.) "Quoted" start.',
     ['He said "stop."', "Then left.", "(See below.)", '"Quoted" start.']),
    ("Para one\n   continues here.\n\n  \t \nPara two\nno period", ["Para one continues here.", "Para two no period"]),
    ("Windows\r\nline ends.\r\n\r\nNew para.", ["Windows line ends.", "New para."]),
    ("Ends with a version 2. 3 items follow.", ["Ends with a version 2.", "3 items follow."]),
    ("", []),
    (" \n\n \t ", []),
    ("No punctuation at all", ["No punctuation at all"]),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_rejects_non_str():
    with pytest.raises(TypeError, match="text"):
        split_sentences(b"bytes")


# --- read_corpus ----------------------------------------------------------------------------------

def test_corpus_properties():
    c = Corpus([["ab", "cde"], ["f"]], "src", {})
    assert (c.num_characters, c.num_sentences, list(c.texts())) == (6, 3, ["ab", "cde", "f"])


def test_txt_blank_lines_separate_documents(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("A one. A two.\nA three\n\n\nB one.\n \t\nC one.\n")
    c = read_corpus(f)
    assert c.documents == [["A one.", "A two.", "A three"], ["B one."], ["C one."]]
    assert (c.source, c.skipped) == (str(f), {})
    other = tmp_path / "c.md"  # any suffix but .jsonl is text
    other.write_text("Markdown text. Second.")
    assert read_corpus(str(other)).documents == [["Markdown text.", "Second."]]


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("From b.")
    (tmp_path / "a" / "z.txt").write_text("From a/z.")
    (tmp_path / "a" / "deep" / "x.txt").write_text("From a/deep/x.")
    (tmp_path / "a" / "b.jsonl").write_text(json.dumps({"text": "From a/b."}) + "\n")
    (tmp_path / "a" / "notes.md").write_text("Not read.")
    (tmp_path / "empty.txt").write_bytes(b"")
    c = read_corpus(tmp_path)
    assert c.documents == [["From a/b."], ["From a/deep/x."], ["From a/z."], ["From b."]]
    assert c.source == f"{tmp_path} (5 files)"
    assert c.skipped == {"empty file": 1}


def test_jsonl_bad_lines_counted(tmp_path):
    f = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "First doc. Two sentences.", "id": 1}), "{not json", "[1, 2]", '"a string"',
             json.dumps({"other": "no text field"}), json.dumps({"text": 5}), json.dumps({"text": None}), "",
             json.dumps({"text": "  "}), "[" * 100_000, json.dumps({"text": "Para one.\n\nPara two."})]
    f.write_text("\n".join(lines) + "\n")
    c = read_corpus(f)
    assert c.documents == [["First doc.", "Two sentences."], ["Para one.", "Para two."]]
    assert c.skipped == {"invalid JSON line": 2, "JSON line not an object": 2, "missing text field": 1,
                         "non-string text field": 2}


def test_jsonl_text_field(tmp_path):
    f = tmp_path / "c.JSONL"
    f.write_text(json.dumps({"body": "Hello there.", "text": 1}) + "\n")
    assert read_corpus(f, text_field="body").documents == [["Hello there."]]
    with pytest.raises(ValueError, match="non-string text field"):
        read_corpus(f)
    with pytest.raises(ValueError, match="text_field"):
        read_corpus(f, text_field="")


def test_undecodable_line_skipped_rest_kept(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"Good one.\n\xff\xfe bad \xc3\x28\nGood two.\r\n\r\nCaf\xc3\xa9 ok.\n")
    c = read_corpus(f)
    assert c.documents == [["Good one.", "Good two."], ["Caf\u00e9 ok."]]
    assert c.skipped == {"undecodable line": 1}
    j = tmp_path / "c.jsonl"
    j.write_bytes(b'{"text": "Fine."}\n{"text": "\xff"}\n')
    c = read_corpus(j)
    assert (c.documents, c.skipped) == ([["Fine."]], {"undecodable line": 1})


def test_bom(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"\xef\xbb\xbfHello there. Second.\n")
    assert read_corpus(f).documents == [["Hello there.", "Second."]]
    j = tmp_path / "c.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"text": "Json with BOM."}\n')
    assert read_corpus(j).documents == [["Json with BOM."]]


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="corpus: .*nowhere.txt does not exist"):
        read_corpus("/nonexistent/nowhere.txt")


def test_empty_and_all_bad_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\xef\xbb\xbf \n\n")
    with pytest.raises(ValueError, match=r"holds no text \(skipped: \{'empty file': 1\}\)"):
        read_corpus(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{oops\n[1]\n{"text": 3}\n{"x": "y"}\n{broken\n')
    with pytest.raises(ValueError) as e:
        read_corpus(bad)
    assert str(e.value) == (f"corpus: {bad} holds no text (skipped: {{'invalid JSON line': 2, "
                            "'JSON line not an object': 1, 'non-string text field': 1, 'missing text field': 1})")
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=f"corpus: the folder {folder} holds no .txt or .jsonl file"):
        read_corpus(folder)
    with pytest.raises(TypeError, match="corpus"):
        read_corpus(3)


def test_none_reads_stdlib(monkeypatch):
    sentinel = Corpus([["x"]], "stdlib", {})
    monkeypatch.setattr(C, "stdlib_docstrings", lambda: sentinel)
    assert read_corpus(None) is sentinel


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_random_bytes_never_crash(tmp_path, suffix):
    rng = random.Random(1234)
    pieces = [b"\n", b"\r\n", b"\n\n", b"{", b"}", b'"text"', b":", b'"', b"\xff", b"\xc3", b"\xef\xbb\xbf",
              b"Word. ", b"\x00", b"[", b"\\u00e9", b"\xe2\x80\xa8"]
    for i in range(30):
        f = tmp_path / f"r{i}{suffix}"
        f.write_bytes(b"".join(rng.choice(pieces) if rng.random() < 0.7 else bytes([rng.randrange(256)])
                               for _ in range(rng.randrange(0, 200))))
        try:
            c = read_corpus(f)
        except ValueError as e:
            assert "holds no text" in str(e)
        else:
            assert c.num_sentences > 0 and all(s.strip() == s and s for s in c.texts())
