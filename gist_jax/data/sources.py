"""Where documents come from: the built-in stdlib corpus, local text/JSONL files, synthetic
recall examples, source specs.

Pure Python (no tensorflow/seqio), so the token store can read local corpora on machines
without tf, and so one split rule serves the Python path, the seqio tasks and the tfds builder.

A document is a ``(doc_id, text)`` pair. Train/validation splits are assigned *by file*, from a
stable hash of the file's name relative to the corpus root (never Python's salted ``hash()``):
every machine, process and run puts the same file in the same split, and no file's text is
shared between the splits.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

from gist_jax.data import synthetic

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
FORMATS = ("auto", "text", "jsonl")
_EXCLUDED_DIRS = ("site-packages", "dist-packages")
_GLOB_CHARS = frozenset("*?[")

SOURCE_SPEC_FORMS = (
    "stdlib",
    "files:<glob>[,<glob>...]",
    "jsonl:<glob>[,<glob>...][#<field>]",
    "tfds:<name>[:<version>][@<data_dir>][#<field>]",
    "seqio:<registered task name>",
    "synthetic:<kind>[?<param>=<value>[&...]]",
)

Document = tuple[str, str]


def split_of(relative_name: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """``"validation"`` for about ``validation_fraction`` of names, else ``"train"``; stable everywhere.

    The first 8 bytes of sha1(name) read as a fraction of 2**64 decide, so the assignment depends
    only on the name (use POSIX separators), not on the machine, process or Python hash seed.
    """
    digest = hashlib.sha1(relative_name.encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2.0**64 < validation_fraction else "train"


def _check_split(split: str | None, allow_none: bool) -> None:
    if split is None and allow_none:
        return
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}" + (" or None (all files)" if allow_none else ""))


# -- the built-in corpus -----------------------------------------------------------------------------
def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard library directory (real text that ships with Python)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str) -> list[pathlib.Path]:
    """Every ``*.py`` of the stdlib (site/dist-packages excluded) in ``split``, sorted by relative path."""
    _check_split(split, allow_none=False)
    root = stdlib_root()
    named = [(name, root / name) for name in _walk_relative(root) if name.endswith(".py")]
    return [path for name, path in sorted(named) if split_of(name) == split]


def iter_stdlib(split: str) -> Iterator[Document]:
    """``(relative path, source text)`` of the built-in corpus; empty/whitespace-only files skipped."""
    root = stdlib_root()
    for path in stdlib_files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield path.relative_to(root).as_posix(), text


def _walk_relative(root: pathlib.Path) -> list[str]:
    """POSIX paths of regular files under ``root`` relative to it (symlinked dirs not followed).

    Hidden entries (``.git``...) and site-/dist-packages are skipped: they are not the corpus.
    """
    names = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in _EXCLUDED_DIRS]
        rel = pathlib.Path(directory).relative_to(root)
        names += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(names)


# -- local files -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceFile:
    """A matched file: ``name`` (relative to its pattern's root) decides the split, ``doc_id`` labels it."""

    path: pathlib.Path
    name: str
    doc_id: str


def match_files(patterns: str | Sequence[str]) -> list[SourceFile]:
    """Files named by ``patterns`` (files, directories walked recursively, globs with ``**``).

    Order: patterns in the order given, each one's files sorted by relative name; a file matched
    twice keeps its first place. The relative name is taken from the pattern's root (the directory
    itself, the part of a glob before its first wildcard, or a file's parent), so a corpus copied
    elsewhere keeps its splits. A pattern matching no file raises ``FileNotFoundError``.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    seen: set[pathlib.Path] = set()
    out: list[SourceFile] = []
    for pattern in map(str, patterns):
        matched = _match_one(pattern)
        if not matched:
            raise FileNotFoundError(f"no files match {pattern!r}")
        for item in matched:
            key = item.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def _match_one(pattern: str) -> list[SourceFile]:
    expanded = os.path.expanduser(pattern)
    if not any(c in _GLOB_CHARS for c in expanded):
        path = pathlib.Path(expanded)
        if path.is_file():
            return [SourceFile(path, path.name, pattern)]
        if path.is_dir():
            return [SourceFile(path / name, name, os.path.join(pattern, name)) for name in _walk_relative(path)]
        return []
    parts = pathlib.PurePath(expanded).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in _GLOB_CHARS for c in part))
    root = pathlib.Path(*parts[:fixed]) if fixed else pathlib.Path(".")
    items: dict[str, SourceFile] = {}
    for hit in glob.glob(expanded, recursive=True):
        hit_path = pathlib.Path(hit)
        if hit_path.is_dir():
            for name in _walk_relative(hit_path):
                rel = (hit_path.relative_to(root) / name).as_posix()
                items[rel] = SourceFile(hit_path / name, rel, os.path.join(hit, name))
        elif hit_path.is_file():
            rel = hit_path.relative_to(root).as_posix()
            items[rel] = SourceFile(hit_path, rel, hit)
    return [items[rel] for rel in sorted(items)]


def matches_any_file(pattern: str) -> bool:
    """Whether ``match_files(pattern)`` would find a file, stopping at the first one: a start-up
    check of a large corpus costs a directory listing, not the full walk the loader does later."""
    expanded = os.path.expanduser(pattern)
    hits = glob.iglob(expanded, recursive=True) if any(c in _GLOB_CHARS for c in expanded) else [expanded]
    return any(_holds_a_file(pathlib.Path(hit)) for hit in hits)


def _holds_a_file(path: pathlib.Path) -> bool:
    """A file, or a directory with a file that ``_walk_relative`` would list."""
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    for _, subdirs, files in os.walk(path):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in _EXCLUDED_DIRS]
        if any(not f.startswith(".") for f in files):
            return True
    return False


def read_documents(file: SourceFile, fmt: str = "auto", text_field: str = "text") -> Iterator[Document]:
    """The documents of one file: the whole file (text), or one per JSONL line (its ``text_field``).

    Text is read as UTF-8 with replacement; files that look binary (a NUL byte in the first 8 KB)
    and empty or whitespace-only documents are skipped, so every source yields only real text.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} must be one of {FORMATS}")
    if fmt == "jsonl" or (fmt == "auto" and file.path.suffix == ".jsonl"):
        yield from _read_jsonl(file, text_field)
        return
    raw = file.path.read_bytes()
    if b"\0" in raw[:8192]:
        return
    text = raw.decode("utf-8", errors="replace")
    if text.strip():
        yield file.doc_id, text


def _read_jsonl(file: SourceFile, text_field: str) -> Iterator[Document]:
    with open(file.path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file.path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{where}: no field {text_field!r} (has {keys}); pass another field with #<field>")
            text = record[text_field]
            if not isinstance(text, str):
                raise TypeError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
            text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates from \ud800 escapes
            if text.strip():
                yield f"{file.doc_id}:{lineno}", text


def iter_files(
    patterns: str | Sequence[str], split: str | None = None, fmt: str = "auto", text_field: str = "text"
) -> Iterator[Document]:
    """Documents of local files in a deterministic order; only the files of ``split`` unless it is None."""
    _check_split(split, allow_none=True)
    for file in match_files(patterns):
        if split is None or split_of(file.name) == split:
            yield from read_documents(file, fmt, text_field)


# -- synthetic recall sources -------------------------------------------------------------------------
# Kind options of `synthetic.generate`, per kind, with their defaults there (None: drawn per example).
SYNTHETIC_KIND_PARAMS: dict[str, dict[str, Any]] = {
    "multikey_needle": {"num_keys": 4}, "multikey_uuid": {"num_keys": 4}, "multivalue": {"num_values": 4},
    "json_kv": {"num_pairs": 8}, "passkey": {"filler": False},
    "surprise_needle": {"relevant": None, "attribute": None}, "uuid_recall": {},
}
assert tuple(SYNTHETIC_KIND_PARAMS) == synthetic.KINDS
_PARAM_TYPES: dict[str, type] = {"relevant": bool, "attribute": str, "filler": bool}
_EXAMPLE_SPEC = "synthetic:passkey?haystack=stdlib&context_tokens=2048&num_examples=200&seed=0"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """``synthetic:<kind>?...``: `synthetic.generate` arguments, minus the split-derived seed."""

    kind: str
    haystack: str = "stdlib"
    context_tokens: int = 1024
    depth_min: float = 0.0
    depth_max: float = 1.0
    num_examples: int = 100
    seed: int = 0
    tokenizer: str = ""  # "": the data tokenizer (the store's or task's), so context_tokens are model tokens
    options: tuple[tuple[str, Any], ...] = ()  # kind options given in the spec, e.g. (("num_keys", 2),)

    def split_seed(self, split: str) -> int:
        """Train and validation draw disjoint example seeds (and their haystacks come from their own split)."""
        _check_split(split, allow_none=False)
        return self.seed * len(SPLITS) + SPLITS.index(split)


# Parameters every kind takes, with their defaults (the fields above).
SYNTHETIC_PARAMS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(SyntheticSpec)
                                    if f.name not in ("kind", "options")}


def _synthetic_value(spec: str, kind: str, key: str, raw: str) -> Any:
    default = SYNTHETIC_PARAMS.get(key, SYNTHETIC_KIND_PARAMS[kind].get(key))
    want = _PARAM_TYPES.get(key, type(default))
    try:
        if want is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        value = want(raw)
    except ValueError:
        what = {bool: "true/false", int: "an integer", float: "a number"}.get(want, want.__name__)
        raise ValueError(f"source spec {spec!r}: parameter {key}={raw!r} is not {what}; "
                         f"write e.g. {key}={default if default is not None else 'true'}") from None
    if key == "attribute" and value not in ("food", "number"):
        raise ValueError(f"source spec {spec!r}: attribute={raw!r}; use attribute=food or attribute=number")
    return value


def parse_synthetic_spec(spec: str) -> SyntheticSpec:
    """``synthetic:<kind>[?k=v&...]`` -> `SyntheticSpec`; errors name the offending key and the fix."""
    body = spec.partition(":")[2]
    kind, _, query = body.partition("?")
    if kind not in synthetic.KINDS:
        raise ValueError(f"source spec {spec!r}: unknown synthetic kind {kind!r}; use one of {synthetic.KINDS}, "
                         f"e.g. {_EXAMPLE_SPEC}")
    known = [*SYNTHETIC_PARAMS, *SYNTHETIC_KIND_PARAMS[kind]]
    values: dict[str, Any] = {}
    for item in (part for part in query.split("&") if part):
        key, eq, raw = item.partition("=")
        if not eq or not key or not raw:
            raise ValueError(f"source spec {spec!r}: parameter {item!r} is not key=value; e.g. {_EXAMPLE_SPEC}")
        if key not in known:
            raise ValueError(f"source spec {spec!r}: unknown parameter {key!r} for synthetic kind {kind!r}; "
                             f"known parameters: {', '.join(known)}")
        if key in values:
            raise ValueError(f"source spec {spec!r}: parameter {key!r} is given twice; keep one")
        values[key] = _synthetic_value(spec, kind, key, raw)
    options = tuple((k, values.pop(k)) for k in list(values) if k in SYNTHETIC_KIND_PARAMS[kind])
    parsed = SyntheticSpec(kind, options=options, **values)
    if parsed.context_tokens < 1 or parsed.num_examples < 1 or parsed.seed < 0:
        raise ValueError(f"source spec {spec!r}: need context_tokens >= 1, num_examples >= 1 and seed >= 0 "
                         f"(got {parsed.context_tokens}, {parsed.num_examples}, {parsed.seed})")
    for key, value in options:
        if key.startswith("num_") and value < 1:
            raise ValueError(f"source spec {spec!r}: {key}={value} must be >= 1")
    if not 0.0 <= parsed.depth_min <= parsed.depth_max <= 1.0:
        raise ValueError(f"source spec {spec!r}: need 0 <= depth_min <= depth_max <= 1 "
                         f"(got depth_min={parsed.depth_min}, depth_max={parsed.depth_max})")
    try:
        haystack = parse_source_spec(parsed.haystack) if parsed.haystack else None
    except ValueError:
        haystack = None
    if haystack is None or not haystack.is_local or haystack.kind == "synthetic":
        raise ValueError(f"source spec {spec!r}: haystack={parsed.haystack!r} must be a local text source "
                         "(stdlib, files:<glob> or jsonl:<glob>); e.g. haystack=stdlib")
    return parsed


def synthetic_examples(parsed: SyntheticSpec, split: str,
                       tokenizer_spec: str | None) -> Iterator[synthetic.RecallExample]:
    """The examples of a synthetic source in ``split``, one at a time, deterministic in (spec, split, tokenizer).

    The haystack is the haystack source's own ``split``, so validation contexts never reuse
    training text. ``context_tokens`` is measured in ``parsed.tokenizer`` tokens, else in
    ``tokenizer_spec``'s (the data tokenizer), so a context fits the model's sequence budget.
    """
    from gist_jax.data.tokenizer import tokenizer_from_spec  # lazy: the tokenizers package is only needed here

    spec = parsed.tokenizer or tokenizer_spec
    if not spec:
        raise ValueError(f"synthetic:{parsed.kind} counts context_tokens in tokens of a tokenizer: add "
                         "&tokenizer=<spec> (e.g. tokenizer=bytes) to the source spec or pass tokenizer_spec")
    tokenizer = tokenizer_from_spec(spec)
    haystack = [text for _, text in iter_source(parsed.haystack, split)]
    for index in range(parsed.num_examples):
        yield from synthetic.generate(parsed.kind, haystack, tokenizer, context_tokens=parsed.context_tokens,
                                      depth=(parsed.depth_min, parsed.depth_max), seed=parsed.split_seed(split),
                                      num_examples=1, start=index, **dict(parsed.options))


def iter_synthetic(parsed: SyntheticSpec, split: str, tokenizer_spec: str | None) -> Iterator[Document]:
    """One training document per example: context, question and answer (`synthetic.as_text` joined)."""
    for index, example in enumerate(synthetic_examples(parsed, split, tokenizer_spec)):
        inputs, targets = synthetic.as_text(example)
        yield f"synthetic:{parsed.kind}/{split}/{index}", inputs + targets


# -- source specs ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec (the compact string a config or command line names a corpus with)."""

    spec: str
    kind: str  # stdlib | files | jsonl | tfds | seqio | synthetic
    patterns: tuple[str, ...] = ()
    text_field: str = "text"
    tfds_name: str = ""
    data_dir: str | None = None
    task_name: str = ""
    synthetic: SyntheticSpec | None = None

    @property
    def is_local(self) -> bool:
        """Read by plain Python (no tf needed): ``stdlib``, ``files``, ``jsonl``, ``synthetic``."""
        return self.kind in ("stdlib", "files", "jsonl", "synthetic")


def parse_source_spec(spec: str) -> SourceSpec:
    """Parse one of ``SOURCE_SPEC_FORMS``; anything else is a ``ValueError`` that lists them."""
    kind, sep, rest = spec.partition(":")
    if spec == "stdlib":
        return SourceSpec(spec, "stdlib")
    if sep and rest and kind == "synthetic":
        return SourceSpec(spec, "synthetic", synthetic=parse_synthetic_spec(spec))
    if sep and rest and kind in ("files", "jsonl", "tfds", "seqio"):
        if kind == "seqio":
            return SourceSpec(spec, "seqio", task_name=rest)
        body, hash_sep, field = rest.rpartition("#") if "#" in rest else (rest, "", "text")
        if hash_sep and not field:
            raise ValueError(f"source spec {spec!r}: empty field after '#'")
        if kind == "files" and hash_sep:
            raise ValueError(f"source spec {spec!r}: '#<field>' only applies to jsonl: and tfds: sources")
        if kind == "tfds":
            name, at, data_dir = body.partition("@")
            if name and (not at or data_dir):
                return SourceSpec(spec, "tfds", text_field=field, tfds_name=name, data_dir=data_dir or None)
        else:
            patterns = tuple(p for p in body.split(",") if p)
            if patterns:
                return SourceSpec(spec, kind, patterns=patterns, text_field=field)
    raise ValueError(f"unknown source spec {spec!r}; expected one of: {', '.join(SOURCE_SPEC_FORMS)}")


def iter_source(spec: str | SourceSpec, split: str, tokenizer_spec: str | None = None) -> Iterator[Document]:
    """Documents of a local source spec (``stdlib``, ``files:``, ``jsonl:``, ``synthetic:``) in ``split``.

    ``tokenizer_spec`` only matters to ``synthetic:`` sources, whose context length is counted in
    tokens (the data tokenizer's, unless the spec names its own ``tokenizer=``).
    """
    parsed = parse_source_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "stdlib":
        return iter_stdlib(split)
    if parsed.kind in ("files", "jsonl"):
        _check_split(split, allow_none=False)
        return iter_files(parsed.patterns, split, "jsonl" if parsed.kind == "jsonl" else "auto", parsed.text_field)
    if parsed.kind == "synthetic":
        _check_split(split, allow_none=False)
        return iter_synthetic(parsed.synthetic, split, tokenizer_spec)
    raise ValueError(f"source {parsed.spec!r} is not local: read it through gist_jax.data.tasks")
