"""Synthetic recall generators: answers recoverable by an independent oracle, controlled depth and
length, determinism, the surprise-needle probe's subjects, and the scoring helpers.

The haystack is real text (a few Python stdlib sources read from disk), as in training.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from gist_jax.data import synthetic
from gist_jax.data.synthetic import (
    KINDS,
    RecallExample,
    as_text,
    generate,
    salient_name,
    score_exact,
    score_uuid_prefixes,
)
from gist_jax.data.tokenizer import ByteTokenizer, HFTokenizer

STDLIB_FILES = ("argparse.py", "textwrap.py", "difflib.py", "json/decoder.py", "dataclasses.py", "functools.py",
                "shlex.py", "fractions.py")
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
BYTES = ByteTokenizer()
# json_kv's object is large in bytes; keep it small enough for 512-token contexts.
OPTIONS = {"json_kv": {"num_pairs": 4}}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in STDLIB_FILES]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf) -> HFTokenizer:
    return HFTokenizer.from_gguf(smollm2_gguf)


NEEDLE_PATTERNS = {
    "multikey_needle": r"One of the special magic numbers for \S+ is: \d+\.",
    "multikey_uuid": r"One of the special magic uuids for \S+ is: \S+\.",
    "multivalue": r"One of the special magic numbers for \S+ is: \d+\.",
    "json_kv": r"JSON data:\n\{[^}]*\}",
    "passkey": r"The pass key is \d{5}\. Remember it\. \d{5} is the pass key\.",
    "surprise_needle": r"(?:[A-Z][a-z]+ [A-Z][a-z]+|\w+)'s special (?:food|number) is \w+\.",
    "uuid_recall": r"The secret UUID is [0-9a-f]{32}\.",
}


def located_depths(example: RecallExample) -> list[float]:
    """Depths of the needles found in the context by pattern: start / (len(context) - len(needle))."""
    found = list(re.finditer(NEEDLE_PATTERNS[example.kind], example.context))
    return sorted(m.start() / (len(example.context) - len(m.group())) for m in found)


def oracle_answers(example: RecallExample) -> tuple[str, ...]:
    """Recover the answer from context + query alone, the way a perfect reader would."""
    context, query = example.context, example.query
    if example.kind in ("multikey_needle", "multikey_uuid"):
        noun = "number" if example.kind == "multikey_needle" else "uuid"
        key = re.search(rf"special magic {noun} for (\S+) mentioned", query).group(1)
        return tuple(re.findall(rf"One of the special magic {noun}s for {re.escape(key)} is: (\S+)\.", context))
    if example.kind == "multivalue":
        key = re.search(r"special magic numbers for (\S+) mentioned", query).group(1)
        return tuple(re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", context))
    if example.kind == "json_kv":
        key = re.search(r'Key: "([^"]+)"', query).group(1)
        start = context.index("JSON data:\n") + len("JSON data:\n")
        obj, _ = json.JSONDecoder().raw_decode(context, start)
        return (obj[key],)
    if example.kind == "passkey":
        return tuple(re.findall(r"The pass key is (\d{5})\. Remember it\.", context))
    if example.kind == "surprise_needle":
        subject, attribute = re.match(r"What is (.+)'s special (food|number)\?", query).groups()
        return tuple(re.findall(rf"{re.escape(subject)}'s special {attribute} is (\w+)\.", context))
    if example.kind == "uuid_recall":
        return tuple(re.findall(r"The secret UUID is ([0-9a-f]{32})\.", context))
    raise AssertionError(example.kind)


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_recovers_answers(kind, corpus):
    examples = generate(kind, corpus, BYTES, context_tokens=2048, depth=(0.0, 1.0), seed=7, num_examples=4)
    assert len(examples) == 4
    for example in examples:
        assert example.kind == kind
        assert oracle_answers(example) == example.answers
        # the reported depths are where the needles really are
        np.testing.assert_allclose(located_depths(example), sorted(example.needle_depths), atol=1e-12)
        inputs, targets = as_text(example)
        assert inputs.startswith(example.context) and inputs.endswith(example.query)
        assert score_exact(targets, example) == 1.0
    assert len({example.answers for example in examples}) > 1  # the answer varies with the index


def test_kind_specific_contents(corpus):
    [multivalue] = generate("multivalue", corpus, BYTES, context_tokens=2048, num_values=6)
    assert len(multivalue.answers) == len(set(multivalue.answers)) == 6
    [multikey] = generate("multikey_needle", corpus, BYTES, context_tokens=2048, num_keys=5)
    assert len(multikey.needle_depths) == 5 and len(set(multikey.metadata["keys"])) == 5
    [json_kv] = generate("json_kv", corpus, BYTES, context_tokens=4096, num_pairs=10)
    obj, _ = json.JSONDecoder().raw_decode(json_kv.context, json_kv.context.index('{"'))
    assert len(obj) == 10 and json_kv.answers == (obj[json_kv.metadata["key"]],)
    [filler] = generate("passkey", corpus, BYTES, context_tokens=1024, filler=True)
    assert "The grass is green." in filler.context and "def " not in filler.context
    [code] = generate("uuid_recall", corpus, BYTES, context_tokens=1024)
    assert re.fullmatch(r"[0-9a-f]{32}", code.answers[0]) and code.metadata["uuid"] == code.answers[0]


@pytest.mark.parametrize("kind", ["passkey", "uuid_recall", "surprise_needle", "json_kv"])
def test_single_needle_depth_sweep(kind, corpus):
    for requested in SWEEP:
        [example] = generate(kind, corpus, BYTES, context_tokens=2048, depth=requested, seed=3, **OPTIONS.get(kind, {}))
        (actual,) = example.needle_depths
        assert abs(actual - requested) <= 0.04, (kind, requested, actual)
        assert example.metadata["requested_depths"] == (requested,)


@pytest.mark.parametrize("kind", ["multikey_needle", "multikey_uuid", "multivalue"])
def test_multi_needle_depths_cover_range(kind, corpus):
    for low, high in [(0.0, 1.0), (0.2, 0.8), (0.5, 0.75)]:
        options = {"num_values" if kind == "multivalue" else "num_keys": 5}
        [example] = generate(kind, corpus, BYTES, context_tokens=4096, depth=(low, high), seed=11, **options)
        actual = sorted(example.needle_depths)
        np.testing.assert_allclose(actual, np.linspace(low, high, 5), atol=0.04)
    explicit = [0.9, 0.1, 0.5, 0.3, 0.7]
    [example] = generate(kind, corpus, BYTES, context_tokens=4096, depth=explicit, seed=11, **options)
    np.testing.assert_allclose(example.needle_depths, explicit, atol=0.04)
    # a single depth clusters the needles there, one after another
    [example] = generate(kind, corpus, BYTES, context_tokens=4096, depth=0.5, seed=11, **options)
    np.testing.assert_allclose(located_depths(example), sorted(example.needle_depths), atol=1e-12)
    assert abs(min(example.needle_depths) - 0.5) <= 0.04
    assert re.search(rf"(?:{NEEDLE_PATTERNS[kind]}\s){{4}}{NEEDLE_PATTERNS[kind]}", example.context)
    assert oracle_answers(example) == example.answers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [512, 2048])
def test_context_length_bytes(kind, length, corpus):
    for example in generate(kind, corpus, BYTES, context_tokens=length, seed=5, num_examples=2,
                            **OPTIONS.get(kind, {})):
        assert example.context_tokens == len(BYTES.encode(example.context))
        assert 0.9 * length <= example.context_tokens <= length


@pytest.mark.parametrize("kind", KINDS)
def test_context_length_smollm2(kind, corpus, smollm2_tokenizer):
    for length in (1024, 4096):
        [example] = generate(kind, corpus, smollm2_tokenizer, context_tokens=length, depth=(0.1, 0.9), seed=2)
        assert example.context_tokens == len(smollm2_tokenizer.encode(example.context))
        assert max(0.9 * length, length - 64) <= example.context_tokens <= length
        assert oracle_answers(example) == example.answers


def test_haystack_is_cut_at_line_ends(corpus):
    """With room to spare the haystack ends at a line end of its last document, not mid-line."""
    complete = 0
    examples = generate("multikey_needle", corpus, BYTES, context_tokens=2048, depth=(0.0, 0.5), num_examples=10)
    for example in examples:
        last_line = example.context.rsplit("\n", 1)[-1]
        complete += any(re.search(rf"(?m)^{re.escape(last_line)}$", document) for document in corpus)
    assert complete >= 8


def test_determinism(corpus):
    for kind in KINDS:
        first = generate(kind, corpus, BYTES, context_tokens=1024, depth=(0.0, 1.0), seed=4, num_examples=3)
        again = generate(kind, corpus, BYTES, context_tokens=1024, depth=(0.0, 1.0), seed=4, num_examples=3)
        other = generate(kind, corpus, BYTES, context_tokens=1024, depth=(0.0, 1.0), seed=5, num_examples=3)
        assert first == again
        assert [e.context for e in first] != [e.context for e in other]
        assert [e.answers for e in first] != [e.answers for e in other]
        assert len({e.context for e in first}) == 3  # examples within one call differ too
        if kind != "surprise_needle":  # the haystack documents are a seeded choice, not the corpus order
            assert len({tuple(e.metadata["document_indices"]) for e in first + other}) > 1
        # example i does not depend on how many were asked for
        assert generate(kind, corpus, BYTES, context_tokens=1024, depth=(0.0, 1.0), seed=4)[0] == first[0]


def test_determinism_across_processes(corpus):
    """No salted hash or global state: a fresh interpreter (different PYTHONHASHSEED) agrees."""
    script = (
        "import pathlib, sysconfig, sys\n"
        "from gist_jax.data.synthetic import generate\n"
        "from gist_jax.data.tokenizer import ByteTokenizer\n"
        "stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])\n"
        f"corpus = [(stdlib / n).read_text(encoding='utf-8') for n in {STDLIB_FILES!r}]\n"
        "[e] = generate('multikey_uuid', corpus, ByteTokenizer(), context_tokens=1024, depth=(0.0, 1.0), seed=9)\n"
        "print(e.answers[0], e.needle_depths)\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=pathlib.Path(__file__).parents[1])
    [example] = generate("multikey_uuid", corpus, BYTES, context_tokens=1024, depth=(0.0, 1.0), seed=9)
    assert out.stdout.strip() == f"{example.answers[0]} {example.needle_depths}"


def test_surprise_needle_subjects(corpus):
    common = {"context_tokens": 2048, "depth": 0.5, "seed": 21, "num_examples": 4}
    relevant = generate("surprise_needle", corpus, BYTES, relevant=True, **common)
    unrelated = generate("surprise_needle", corpus, BYTES, relevant=False, **common)
    for rel, unrel in zip(relevant, unrelated):
        assert rel.metadata["relevant"] is True and unrel.metadata["relevant"] is False
        subject = rel.metadata["subject"]
        assert subject == rel.metadata["document_subject"]
        document = corpus[rel.metadata["document_index"]]
        assert re.search(rf"\b{re.escape(subject)}\b", document)
        needle = f"{subject}'s special {rel.metadata['attribute']} is {rel.answers[0]}."
        assert re.search(rf"\b{re.escape(subject)}\b", rel.context.replace(needle, ""))  # seen outside the needle
        assert rel.context.replace(needle + "\n", "").replace(needle + " ", "") in document  # one document only
        # the unrelated example is the same example except for the subject
        assert unrel.metadata["document_index"] == rel.metadata["document_index"]
        assert unrel.answers == rel.answers and unrel.metadata["attribute"] == rel.metadata["attribute"]
        name = unrel.metadata["subject"]
        assert name != subject and re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name)
        assert not any(re.search(rf"\b{part}\b", document) for part in name.split())
    mixed = generate("surprise_needle", corpus, BYTES, context_tokens=1024, seed=1, num_examples=16)
    assert {e.metadata["relevant"] for e in mixed} == {True, False}
    assert {e.metadata["attribute"] for e in mixed} == {"food", "number"}
    [number] = generate("surprise_needle", corpus, BYTES, context_tokens=1024, attribute="number")
    assert number.metadata["attribute"] == "number" and number.answers[0].isdigit()
    with pytest.raises(ValueError, match="attribute"):
        generate("surprise_needle", corpus, BYTES, context_tokens=1024, attribute="color")


def test_unrelated_name_is_absent_from_the_document(corpus):
    """The unrelated subject is drawn only from names the document never mentions."""
    names = synthetic._FIRST_NAMES[:-1] + synthetic._LAST_NAMES[:-1]  # all but "Zora" and "Zielinski"
    document = corpus[3] + "\n# Mentions " + " and ".join(names) + ".\n"  # far beyond the context
    examples = generate("surprise_needle", [document], BYTES, context_tokens=1024, relevant=False, num_examples=5)
    assert {e.metadata["subject"] for e in examples} == {"Zora Zielinski"}
    everyone = corpus[3] + "\n# " + " ".join(synthetic._FIRST_NAMES + synthetic._LAST_NAMES) + "\n"
    with pytest.raises(ValueError, match="person name"):
        generate("surprise_needle", [everyone], BYTES, context_tokens=1024, relevant=False)


def test_salient_name():
    code = "class Helper:\n    pass\n\nclass Parser(Helper):\n    '''Parser parses.'''\n\nx = Parser()\n"
    assert salient_name(code) == "Parser"  # 3 mentions vs Helper's 2
    assert salient_name(code, window="Helper is used here") == "Helper"
    assert salient_name("def _private(): pass\ndef build(): pass\nbuild()\n") == "build"
    prose = "The Curie family. Marie Curie won. Then Curie won again. The end."
    assert salient_name(prose) == "Curie"
    assert salient_name("nothing capitalised here") is None


def test_uuid_prefix_scoring():
    uuid = "0123456789abcdef0123456789abcdef"
    assert score_uuid_prefixes(uuid[:10] + "zzzz", uuid) == {8: 1.0, 16: 0.0, 32: 0.0}
    assert score_uuid_prefixes(f"  {uuid[:20]}ffffffffffff\n", uuid) == {8: 1.0, 16: 1.0, 32: 0.0}
    assert score_uuid_prefixes(f" {uuid}.", uuid) == {8: 1.0, 16: 1.0, 32: 1.0}
    assert score_uuid_prefixes("x" + uuid, uuid) == {8: 0.0, 16: 0.0, 32: 0.0}
    assert score_uuid_prefixes("0123456", uuid) == {8: 0.0, 16: 0.0, 32: 0.0}
    assert score_uuid_prefixes("0123", uuid, prefixes=(4,)) == {4: 1.0}


def test_score_exact():
    values = ("1111111", "2222222", "3333333", "4444444")
    multivalue = RecallExample("multivalue", "ctx", "q", values, (0.5,) * 4, 3)
    assert score_exact("1111111, 3333333", multivalue) == 0.5
    assert score_exact("4444444 3333333 2222222 1111111", multivalue) == 1.0
    assert score_exact("none", multivalue) == 0.0
    single = RecallExample("passkey", "ctx", "q", ("12345",), (0.5,), 3)
    assert score_exact(" The pass key is 12345.", single) == 1.0
    assert score_exact("1234", single) == 0.0


def test_errors(corpus):
    with pytest.raises(ValueError, match="multikey_needle"):
        generate("needle", corpus, BYTES, context_tokens=512)
    with pytest.raises(ValueError, match="needles alone"):
        generate("json_kv", corpus, BYTES, context_tokens=256, num_pairs=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generate("passkey", corpus, BYTES, context_tokens=512, depth=1.5)
    with pytest.raises(ValueError, match="3 depths given for 4 needles"):
        generate("multikey_needle", corpus, BYTES, context_tokens=512, depth=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="salient name"):
        generate("surprise_needle", ["short doc"], BYTES, context_tokens=512)
    with pytest.raises(ValueError, match="empty"):
        generate("passkey", [], BYTES, context_tokens=512)
    with pytest.raises(TypeError):
        generate("passkey", corpus, BYTES, context_tokens=512, num_keys=3)
    with pytest.raises(ValueError, match="num_"):
        generate("multikey_needle", corpus, BYTES, context_tokens=512, num_keys=0)
    with pytest.raises(TypeError, match="single string"):
        generate("passkey", corpus[0], BYTES, context_tokens=512)


def test_small_corpus_is_reused(corpus):
    """A corpus shorter than the context is cycled, not an error."""
    [example] = generate("passkey", [corpus[1][:300], corpus[2][:200]], BYTES, context_tokens=2048)
    assert 0.9 * 2048 <= example.context_tokens <= 2048
    assert example.metadata["document_indices"].count(0) > 1
    # any iterable of documents works and gives the same examples as the list
    assert generate("passkey", iter(corpus), BYTES, context_tokens=512) == generate("passkey", corpus, BYTES,
                                                                                    context_tokens=512)
    assert synthetic.KINDS == KINDS
