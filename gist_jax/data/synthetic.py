"""Synthetic long-context recall examples built from any real-text haystack.

Why this exists: the paper's synthetic-recall scores (HELMET JSON KV, RULER MK-needle / MK-UUID /
MV) and its two probes ("lost if surprise": a needle about the document's own subject vs an
unrelated name; "lost along the way": reproduce a 32-character UUID, scored on 8/16/32-char
prefixes) need examples whose answer is known exactly and whose needle depth and context length
are controlled. Everything is pure Python + numpy (no tensorflow/seqio), so trainers, benchmarks
and evaluators can all use it.

Determinism: example `index` of a call draws everything from
``numpy.random.default_rng(SeedSequence([crc32(kind), seed, index]))`` -- never global state or
Python's salted ``hash`` -- so the same (kind, corpus, tokenizer, params, seed) gives identical
examples on every process and run, and example i does not depend on how many were asked for.

Layout: a kind builder draws needles, query and answers (`_Plan`); the haystack is seeded corpus
documents joined by blank lines (or one subject document, or passkey filler); `_fit_context`
inserts the needles at line/sentence starts nearest the requested depths and searches where to
cut the haystack (at whitespace, preferring a line end when that costs at most
``min(64, 5%)`` tokens; mid-word only when no whitespace cut gets that close) so the assembled
context has at most `context_tokens` tokens, measured by encoding it whole.

Needle depth = character offset of the needle's first character / (len(context) - len(needle)):
0.0 is the first thing in the context, 1.0 the last, whatever the needle's own length.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from uuid import UUID

import numpy as np

KINDS = ("multikey_needle", "multikey_uuid", "multivalue", "json_kv", "passkey", "surprise_needle", "uuid_recall")
_ALL_ANSWERS_REQUIRED = frozenset({"multivalue"})  # other kinds: any one listed answer is complete

# Word lists, blank-line separated: RULER-style key words (adjectives, nouns), unrelated people (first,
# last names), foods, and capitalised words that start sentences or are Python literals (never a subject).
_WORD_LISTS = """
amber brave calm dusty eager fancy gentle hollow icy jolly keen lively misty noble odd polite quiet rapid shiny tidy
upbeat vivid witty young zesty bitter crisp frozen golden humble

anchor badger canyon dolphin ember falcon glacier harbor island jacket kettle lantern meadow nebula orchard pebble
quartz river saddle tunnel umbrella valley walnut yarn zephyr beacon cactus drum

Alice Bruno Chiara Dmitri Elena Farid Greta Hiroshi Ingrid Jamal Keiko Lars Mireille Nadia Oskar Priya Quentin Rosa
Sven Tamsin Ulrich Vera Wiktor Ximena Yusuf Zora

Abernathy Brennan Castellanos Dubois Eriksen Fontaine Galloway Haldane Iwasaki Jovanovic Kowalski Lindqvist Marchetti
Novak Okafor Petrov Quigley Rasmussen Sandoval Takahashi Underwood Valdez Whitfield Zielinski

pizza sushi lasagna dumplings pancakes tacos paella ramen falafel risotto goulash burritos croissants kimchi curry
hummus moussaka pierogi ravioli couscous

The This That These Those There Then When Where What Which While With Without For From Into Its And But Not None True
False Return Returns Raise Raises Use Used Using See Note Also Each All Any Some Only
"""
_ADJECTIVES, _NOUNS, _FIRST_NAMES, _LAST_NAMES, _FOODS, _SENTENCE_WORDS = (
    tuple(block.split()) for block in _WORD_LISTS.strip().split("\n\n")
)
_NOT_NAMES = frozenset(_SENTENCE_WORDS)
_ATTRIBUTES = ("food", "number")
_PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_CLASS_DEF = re.compile(r"^[ \t]*class[ \t]+([A-Za-z]\w*)", re.MULTILINE)
_FUNCTION_DEF = re.compile(r"^def[ \t]+([A-Za-z]\w*)", re.MULTILINE)  # module-level, public
_CAPITALISED = re.compile(r"\b[A-Z][a-z]{2,}\b")
_WHITESPACE_RUN = re.compile(r"\s+")
_SENTENCE_START = re.compile(r"[.!?] (?=[A-Z])")


class TokenCounter(Protocol):
    """The part of `gist_jax.data.tokenizer.Tokenizer` used here: lengths are measured in its tokens."""

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class RecallExample:
    """One recall example. `needle_depths` are the actual depths, one per needle in creation order."""

    kind: str
    context: str
    query: str  # question + answer prefix, asked after the context
    answers: tuple[str, ...]  # multivalue: all required; other kinds: any one is a complete answer
    needle_depths: tuple[float, ...]
    context_tokens: int  # len(tokenizer.encode(context))
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class _Request:
    corpus: Sequence[str]
    tokenizer: TokenCounter
    context_tokens: int
    depth: Any


@dataclasses.dataclass
class _Plan:
    """What a kind decides before the haystack is laid out."""

    needles: list[str]
    depths: tuple[float, ...]  # requested, one per needle
    query: str
    answers: tuple[str, ...]
    metadata: dict[str, Any]
    documents: list[str] | None = None  # fixed haystack (subject document, filler); None: draw from the corpus


# --- Public API ---
def generate(
    kind: str,
    haystack: Sequence[str] | Iterable[str],
    tokenizer: TokenCounter,
    *,
    context_tokens: int,
    depth: float | tuple[float, float] | Sequence[float] = 0.5,
    seed: int = 0,
    num_examples: int = 1,
    start: int = 0,
    **kind_options: Any,
) -> list[RecallExample]:
    """Examples ``start .. start + num_examples - 1`` of `kind`, contexts of at most (and close to)
    `context_tokens` tokens (``start`` lets a stream draw them one at a time, same examples).

    `depth`: a float puts every needle there (multi-needle kinds: consecutively); a 2-tuple
    ``(lo, hi)`` is a range -- single-needle kinds draw a depth uniformly from it per example,
    multi-needle kinds spread their needles evenly from lo to hi; any other sequence gives one
    explicit depth per needle. Kind options (defaults): multikey_needle / multikey_uuid
    ``num_keys=4``; multivalue ``num_values=4``; json_kv ``num_pairs=8``; passkey ``filler=False``
    (True: the classic "The grass is green..." filler instead of the corpus); surprise_needle
    ``relevant=None`` (None: a seeded coin flip per example) and ``attribute=None``
    ("food" | "number"; None: seeded choice).
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown synthetic recall kind {kind!r}; expected one of {KINDS}")
    if isinstance(haystack, str):
        raise TypeError("haystack must be a sequence of documents, not a single string")
    counts = {k: v for k, v in kind_options.items() if k.startswith("num_")}
    if context_tokens < 1 or seed < 0 or num_examples < 0 or start < 0 or any(int(v) < 1 for v in counts.values()):
        raise ValueError(f"need context_tokens >= 1, seed >= 0, num_examples >= 0, start >= 0 and num_* >= 1; got "
                         f"{context_tokens=}, {seed=}, {num_examples=}, {start=}, {counts}")
    corpus = haystack if isinstance(haystack, Sequence) else list(haystack)
    request = _Request(corpus, tokenizer, context_tokens, depth)
    return [_generate_one(kind, request, seed, index, kind_options) for index in range(start, start + num_examples)]


def as_text(example: RecallExample) -> tuple[str, str]:
    """(inputs, targets) for seqio-style tasks: context, blank line, query; then " " + the answers.

    The leading space makes the target continue the query's answer prefix as a separate word.
    """
    return f"{example.context}\n\n{example.query}", " " + ", ".join(example.answers)


def score_exact(prediction: str, example: RecallExample) -> float:
    """Case-insensitive substring match (RULER's string_match): multivalue gets the fraction of its
    values present; other kinds 1.0 if any acceptable answer is present, else 0.0."""
    text = prediction.lower()
    hits = [answer.lower() in text for answer in example.answers]
    if not hits:
        return 0.0
    if example.kind in _ALL_ANSWERS_REQUIRED:
        return sum(hits) / len(hits)
    return float(any(hits))


def score_uuid_prefixes(prediction: str, uuid: str, prefixes: Sequence[int] = (8, 16, 32)) -> dict[int, float]:
    """The paper's "lost along the way" metric: 1.0 for prefix length p iff the stripped prediction
    starts with ``uuid[:p]`` (so errors late in the UUID still earn the short prefixes)."""
    text = prediction.strip()
    return {int(p): float(text.startswith(uuid[:p])) for p in prefixes}


def salient_name(document: str, window: str | None = None) -> str | None:
    """The name a document is "about", counted in `window` (default: the whole document).

    The corpus gives only text (no file names, so no module names). Choice, in order: (1) among
    public classes defined anywhere in the document (``class Name``), the one mentioned most often
    (whole word) in `window`; (2) likewise for public module-level functions (``def name``);
    (3) prose: the most frequent capitalised word (not a sentence starter/literal) occurring at
    least twice in `window`. Ties go to the earliest definition / first occurrence. Returns None
    if nothing qualifies. Counting in the window that ends up in the context means the subject
    really appears there.
    """
    window = document if window is None else window
    for pattern in (_CLASS_DEF, _FUNCTION_DEF):
        names = list(dict.fromkeys(name for name in pattern.findall(document) if not name.startswith("_")))
        counts = {name: len(re.findall(rf"\b{re.escape(name)}\b", window)) for name in names}
        best = max(names, key=counts.__getitem__, default=None)  # max keeps the first of equal counts
        if best is not None and counts[best] > 0:
            return best
    words = Counter(word for word in _CAPITALISED.findall(window) if word not in _NOT_NAMES)
    if words:
        word, count = words.most_common(1)[0]
        if count >= 2:
            return word
    return None


# --- Kind builders: (rng, request, **options) -> _Plan ---
def _multikey_needle(rng: np.random.Generator, request: _Request, num_keys: int = 4) -> _Plan:
    return _multikey_plan(rng, request, _word_keys(rng, num_keys), _magic_numbers(rng, num_keys), "number")


def _multikey_uuid(rng: np.random.Generator, request: _Request, num_keys: int = 4) -> _Plan:
    keys = [_uuid4(rng) for _ in range(num_keys)]
    return _multikey_plan(rng, request, keys, [_uuid4(rng) for _ in range(num_keys)], "uuid")


def _multikey_plan(rng: np.random.Generator, request: _Request, keys: list[str], values: list[str], noun: str) -> _Plan:
    target = int(rng.integers(len(keys)))
    key = keys[target]
    needles = [f"One of the special magic {noun}s for {k} is: {v}." for k, v in zip(keys, values)]
    query = (f"What is the special magic {noun} for {key} mentioned in the provided text?\n"
             f"Answer: The special magic {noun} for {key} mentioned in the provided text is")
    metadata = {"key": key, "keys": tuple(keys), "values": tuple(values), "query_index": target}
    return _Plan(needles, _resolve_depths(request.depth, len(needles), rng), query, (values[target],), metadata)


def _multivalue(rng: np.random.Generator, request: _Request, num_values: int = 4) -> _Plan:
    key, values = _word_keys(rng, 1)[0], _magic_numbers(rng, num_values)
    needles = [f"One of the special magic numbers for {key} is: {value}." for value in values]
    query = (f"What are all the special magic numbers for {key} mentioned in the provided text?\n"
             f"Answer: The special magic numbers for {key} mentioned in the provided text are")
    depths = _resolve_depths(request.depth, len(needles), rng)
    return _Plan(needles, depths, query, tuple(values), {"key": key, "values": tuple(values)})


def _json_kv(rng: np.random.Generator, request: _Request, num_pairs: int = 8) -> _Plan:
    pairs = {_uuid4(rng): _uuid4(rng) for _ in range(num_pairs)}
    keys = list(pairs)
    target = int(rng.integers(num_pairs))
    needle = "JSON data:\n" + json.dumps(pairs)
    query = ("Extract the value corresponding to the specified key in the JSON object above.\n"
             f'Key: "{keys[target]}"\nCorresponding value:')
    metadata = {"key": keys[target], "num_pairs": num_pairs, "query_index": target}
    return _Plan([needle], _resolve_depths(request.depth, 1, rng), query, (pairs[keys[target]],), metadata)


def _passkey(rng: np.random.Generator, request: _Request, filler: bool = False) -> _Plan:
    passkey = str(int(rng.integers(10_000, 100_000)))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    documents = None
    if filler:
        repeats = math.ceil((request.context_tokens + 64) / max(1, len(request.tokenizer.encode(_PASSKEY_FILLER))))
        documents = [" ".join([_PASSKEY_FILLER] * repeats)]
    query = "What is the pass key?\nAnswer: The pass key is"
    depths = _resolve_depths(request.depth, 1, rng)
    return _Plan([needle], depths, query, (passkey,), {"filler": filler}, documents)


def _surprise_needle(
    rng: np.random.Generator, request: _Request, relevant: bool | None = None, attribute: str | None = None
) -> _Plan:
    if attribute is not None and attribute not in _ATTRIBUTES:
        raise ValueError(f"attribute must be one of {_ATTRIBUTES} or None, got {attribute!r}")
    document_index, head, document_subject = _subject_document(rng, request)
    # Always draw the coin and the attribute, so relevant=True/False at one seed share everything else.
    coin, attribute_draw = bool(rng.integers(2)), _ATTRIBUTES[int(rng.integers(2))]
    relevant = coin if relevant is None else bool(relevant)
    attribute = attribute_draw if attribute is None else attribute
    food, number = _FOODS[int(rng.integers(len(_FOODS)))], str(int(rng.integers(100, 10_000)))
    value = food if attribute == "food" else number
    depths = _resolve_depths(request.depth, 1, rng)
    subject = document_subject if relevant else _unrelated_name(rng, request.corpus[document_index])
    needle = f"{subject}'s special {attribute} is {value}."
    query = f"What is {subject}'s special {attribute}?\nAnswer: {subject}'s special {attribute} is"
    metadata = {"relevant": relevant, "subject": subject, "document_subject": document_subject,
                "attribute": attribute, "document_index": document_index}
    return _Plan([needle], depths, query, (value,), metadata, [head])


def _uuid_recall(rng: np.random.Generator, request: _Request) -> _Plan:
    code = _uuid4(rng, dashes=False)
    needle = f"The secret UUID is {code}."
    query = "What is the secret UUID? Reproduce all 32 characters exactly.\nAnswer: The secret UUID is"
    return _Plan([needle], _resolve_depths(request.depth, 1, rng), query, (code,), {"uuid": code})


_BUILDERS: dict[str, Callable[..., _Plan]] = {
    "multikey_needle": _multikey_needle, "multikey_uuid": _multikey_uuid, "multivalue": _multivalue,
    "json_kv": _json_kv, "passkey": _passkey, "surprise_needle": _surprise_needle, "uuid_recall": _uuid_recall,
}
assert tuple(_BUILDERS) == KINDS


# --- Drawing helpers ---
def _word_keys(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct RULER-style word keys such as "misty-lantern"."""
    picks = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=count, replace=False)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in picks]


def _magic_numbers(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct 7-digit numbers (RULER's value format)."""
    return [str(int(v)) for v in rng.choice(9_000_000, size=count, replace=False) + 1_000_000]


def _uuid4(rng: np.random.Generator, dashes: bool = True) -> str:
    value = UUID(bytes=rng.bytes(16), version=4)
    return str(value) if dashes else value.hex


def _resolve_depths(depth: Any, count: int, rng: np.random.Generator) -> tuple[float, ...]:
    if isinstance(depth, tuple) and len(depth) == 2:
        low, high = float(depth[0]), float(depth[1])
        if low > high:
            raise ValueError(f"depth range {depth} has low > high")
        depths = (float(rng.uniform(low, high)),) if count == 1 else tuple(np.linspace(low, high, count).tolist())
    elif np.ndim(depth) == 0:
        depths = (float(depth),) * count
    else:
        depths = tuple(float(d) for d in depth)
        if len(depths) != count:
            raise ValueError(f"{len(depths)} depths given for {count} needles")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must lie in [0, 1], got {depths}")
    return depths


def _unrelated_name(rng: np.random.Generator, document: str) -> str:
    """A person's name neither part of which occurs in the document (so it is truly unrelated)."""
    firsts, lasts = ([name for name in names if not re.search(rf"\b{name}\b", document)]
                     for names in (_FIRST_NAMES, _LAST_NAMES))
    if not firsts or not lasts:
        raise ValueError("every candidate person name occurs in the document")
    return f"{firsts[int(rng.integers(len(firsts)))]} {lasts[int(rng.integers(len(lasts)))]}"


def _subject_document(rng: np.random.Generator, request: _Request) -> tuple[int, str, str]:
    """A seeded document long enough to fill the context alone, its head (>= budget tokens) and subject.

    The subject is counted in the document's first half-budget of tokens, which always ends up in
    the context (checked in `_generate_one`), so a "relevant" needle names what the reader has seen.
    """
    tokenizer, budget = request.tokenizer, request.context_tokens
    for index in rng.permutation(len(request.corpus)):
        document = request.corpus[int(index)].strip()
        if len(document.encode("utf-8")) < budget:  # cheap skip: byte-level tokenizers never exceed bytes
            continue
        head = document[: max(4096, 8 * (budget + 64))]  # bounds the encode cost of huge documents
        head_tokens = len(tokenizer.encode(head))
        if head_tokens < budget:
            continue
        # about the first half-budget of tokens, estimated by characters (the context keeps ~95%)
        subject = salient_name(document, head[: len(head) * budget // (2 * head_tokens)])
        if subject is not None:
            return int(index), head, subject
    raise ValueError(f"no haystack document has >= {budget} tokens and a salient name; "
                     "use a smaller context_tokens or longer documents")


def _draw_haystack(rng: np.random.Generator, request: _Request, tokens: int) -> tuple[str, list[int]]:
    """Seeded corpus documents joined by blank lines until about `tokens` tokens (reusing documents if needed)."""
    if len(request.corpus) == 0:
        raise ValueError("the haystack corpus is empty")
    pieces: list[str] = []
    indices: list[int] = []
    total = 0
    while total < tokens:
        added = 0
        for index in rng.permutation(len(request.corpus)):
            # Never more than 8 characters per missing token: the tail of a huge document is never encoded.
            piece = request.corpus[int(index)].strip()[: max(4096, 8 * (tokens - total))].strip()
            count = len(request.tokenizer.encode(piece)) if piece else 0
            if count:
                pieces.append(piece)
                indices.append(int(index))
                total, added = total + count, added + count
            if total >= tokens:
                break
        if added == 0:
            raise ValueError("every haystack document is empty")
    return "\n\n".join(pieces), indices


# --- Layout: needle insertion and fitting the context to the token budget ---
def _cut_points(text: str) -> list[int]:
    """0, the start of every whitespace run (a prefix cut there ends on a non-space), and len(text)."""
    return sorted({0, len(text), *(m.start() for m in _WHITESPACE_RUN.finditer(text))})


def _last_fitting(cuts: Sequence[int], count: Callable[[int], int], budget: int) -> int:
    """Largest cut in sorted `cuts` with ``count(cut) <= budget`` (cuts[0] is assumed to fit).

    Token counts grow almost linearly with the cut, so this interpolates (Illinois regula falsi,
    with bisection as a backstop) instead of bisecting: a 16K-token context then costs a handful
    of encodes, not log2(number of cuts).
    """
    low, high = 0, len(cuts) - 1
    excess_high = count(cuts[high]) - budget - 0.5  # the root lies between the last fit and the first miss
    if excess_high < 0:
        return cuts[high]
    excess_low, last_side, steps = count(cuts[low]) - budget - 0.5, 0, 0
    while high - low > 1:
        steps += 1
        guess = cuts[low] + (cuts[high] - cuts[low]) * excess_low / (excess_low - excess_high)
        middle = bisect.bisect_left(cuts, guess) if steps <= 8 else (low + high) // 2
        middle = min(max(middle, low + 1), high - 1)
        excess = count(cuts[middle]) - budget - 0.5
        if excess < 0:
            low, excess_low = middle, excess
            excess_high /= 2 if last_side < 0 else 1  # Illinois: damp the endpoint that keeps surviving
            last_side = -1
        else:
            high, excess_high = middle, excess
            excess_low /= 2 if last_side > 0 else 1
            last_side = 1
    return cuts[low]


def _insertion_points(haystack: str) -> list[int]:
    """Where a needle may go: line starts, sentence starts, and both ends."""
    points = {0, len(haystack)}
    points.update(m.end() for m in re.finditer("\n", haystack))
    points.update(m.end() for m in _SENTENCE_START.finditer(haystack))
    return sorted(points)


def _insert_needles(haystack: str, needles: Sequence[str], depths: Sequence[float]) -> tuple[str, list[int]]:
    """Context with each needle at the insertion point nearest its depth; returns (context, needle offsets)."""
    points = _insertion_points(haystack)
    total = len(haystack) + sum(len(needle) + 1 for needle in needles)
    placed: list[tuple[int, int]] = []
    shift = previous = 0
    for i in sorted(range(len(needles)), key=lambda i: depths[i]):
        wanted = min(max(depths[i] * (total - len(needles[i])) - shift, 0.0), float(len(haystack)))
        j = bisect.bisect_left(points, wanted)
        nearest = min(points[max(j - 1, 0):j + 1], key=lambda p: abs(p - wanted))
        previous = max(nearest, previous)
        placed.append((previous, i))
        shift += len(needles[i]) + 1
    parts: list[str] = []
    offsets = [0] * len(needles)
    length = last = 0
    for position, i in placed:
        parts.append(haystack[last:position])
        length, last = length + position - last, position
        at_end, line_start = bool(haystack) and position == len(haystack), haystack[position - 1:position] in ("", "\n")
        prefix, suffix = ("\n", "") if at_end else ("", "\n" if line_start else " ")
        offsets[i] = length + len(prefix)
        parts.append(prefix + needles[i] + suffix)
        length += len(prefix) + len(needles[i]) + len(suffix)
    parts.append(haystack[last:])
    return "".join(parts).rstrip(), offsets  # rstrip only removes a separator after a final needle


def _fit_context(
    text: str, needles: Sequence[str], depths: Sequence[float], tokenizer: TokenCounter, budget: int
) -> tuple[str, list[int], int]:
    """Needles inserted into the longest prefix of `text` whose assembled context has <= budget tokens.

    Returns (context, needle offsets, context tokens)."""
    counts: dict[int, int] = {}

    def count(cut: int) -> int:
        if cut not in counts:
            counts[cut] = len(tokenizer.encode(_insert_needles(text[:cut], needles, depths)[0]))
        return counts[cut]

    if count(0) > budget:
        raise ValueError(f"the needles alone take {count(0)} tokens, more than context_tokens={budget}")
    slack = min(64, math.ceil(0.05 * budget))
    cuts = _cut_points(text)
    best = _last_fitting(cuts, count, budget)
    line_ends = [m.start() for m in _WHITESPACE_RUN.finditer(text) if "\n" in m.group() and m.start() <= best]
    if line_ends and budget - slack <= count(line_ends[-1]) <= budget:
        best = line_ends[-1]
    elif count(best) < budget - slack and best < len(text):  # a long unbroken run: cut inside it
        following = cuts[bisect.bisect_right(cuts, best)]
        best = _last_fitting(range(best, following + 1), count, budget)
    return (*_insert_needles(text[:best], needles, depths), count(best))


def _generate_one(kind: str, request: _Request, seed: int, index: int, options: dict[str, Any]) -> RecallExample:
    rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(kind.encode()), seed, index]))
    plan = _BUILDERS[kind](rng, request, **options)
    metadata = dict(plan.metadata)
    if plan.documents is None:
        text, metadata["document_indices"] = _draw_haystack(rng, request, request.context_tokens + 64)
    else:
        text = "\n\n".join(plan.documents)
    context, offsets, tokens = _fit_context(text, plan.needles, plan.depths, request.tokenizer, request.context_tokens)
    depths = tuple(offset / max(1, len(context) - len(needle)) for offset, needle in zip(offsets, plan.needles))
    if "document_subject" in metadata:  # the subject document really shows its subject outside the needle
        outside = context[:offsets[0]] + context[offsets[0] + len(plan.needles[0]):]
        if not re.search(rf"\b{re.escape(metadata['document_subject'])}\b", outside):
            raise RuntimeError(f"subject {metadata['document_subject']!r} fell out of the context")
    metadata["requested_depths"] = plan.depths
    return RecallExample(kind, context, plan.query, plan.answers, depths, tokens, metadata)
