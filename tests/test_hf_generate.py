"""The export the way users call it: transformers' ``generate`` and ``pipeline`` on the
compressed forward, batches of prompts of different lengths (left padding), sampling, stopping
criteria, ``use_cache``, ``labels``, and the ``gist_forward``/``gist_ratio`` switches lm-eval
sets through ``--model_args``.

The tiny Llama export of test_export_hf (segments of 16 tokens, ratios 4 and 8, 4 sinks, byte
tokenizer). Every greedy output is checked token for token against the same prompt alone and
against ``gist_jax.inference.generate`` (JAX); padding is checked to change nothing at all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from test_export_hf import L, _case, jax_raw_logits, tiny_model

from gist_jax.data.tokenizer import hf_tokenizer_copy
from gist_jax.hf import export

LENGTHS = (5, 9, 16, 17, 33, 40, 52, 70)  # inside one segment, on a boundary, across 1-4 boundaries
PAD = 0


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    cfg, comp, params = tiny_model("llama")
    comp = _case(comp, "fine_kv", "aligned", 4, 4).replace(ratios=(4, 8), ratio_sampling="per_instance")
    directory = tmp_path_factory.mktemp("gen") / "hf"
    export.export_params(cfg, comp, params, hf_tokenizer_copy("bytes"), directory)
    return cfg, comp, params, directory


def _load(directory, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, dtype=torch.float32, **kwargs).eval()


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, size=n).tolist() for n in LENGTHS]


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_export_config_switches(export_dir):
    _, _, _, directory = export_dir
    hf = json.loads((directory / "config.json").read_text())
    assert (hf["gist_forward"], hf["gist_ratio"]) == ("compressed", None)


def test_forward_is_compressed_by_default_and_switches(export_dir):
    """What lm-eval's hf backend calls (``model(ids).logits``) is the compressed model;
    ``gist_forward='full'`` is the stock one and ``gist_ratio`` picks the ratio."""
    cfg, comp, params, directory = export_dir
    tokens = np.asarray(_prompts(1)[-1:], np.int64)  # 70 tokens: 4 boundaries
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        default = _load(directory)(ids).logits.numpy()
        full = _load(directory, gist_forward="full")(ids).logits.numpy()
        stock = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)(ids).logits
        r8 = _load(directory, gist_ratio=8)(ids).logits.numpy()
    np.testing.assert_allclose(default, jax_raw_logits(cfg, comp.replace(ratios=(4,)), params, tokens), atol=1e-4)
    np.testing.assert_allclose(r8, jax_raw_logits(cfg, comp.replace(ratios=(8,)), params, tokens), atol=1e-4)
    np.testing.assert_allclose(full, stock.numpy(), atol=1e-5)
    assert np.abs(default[:, 2 * L:] - full[:, 2 * L:]).max() > 1e-2  # compression is on
    with pytest.raises(ValueError, match="gist_forward"):
        _load(directory, gist_forward="sometimes")(ids)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_each_row_alone(export_dir, side):
    """A padded row's real-token logits equal the row alone, whatever the padding ids are
    (padding enters no gist and shifts no position)."""
    _, _, _, directory = export_dir
    model = _load(directory)
    prompts = _prompts(2)
    ids, mask = _left_padded(prompts)
    if side == "right":
        ids, mask = _left_padded([p[::-1] for p in prompts])
        ids, mask = ids.flip(1), mask.flip(1)
    other = torch.where(mask.bool(), ids, torch.full_like(ids, 77))
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        batch_other_pads = model(other, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0]
            np.testing.assert_allclose(batch[i][mask[i].bool()].numpy(), alone.numpy(), atol=1e-5)
    np.testing.assert_array_equal(batch.numpy(), batch_other_pads.numpy())


def test_batched_greedy_equals_alone_and_jax(export_dir):
    """8 prompts of 5-70 tokens, left padded, 24 new tokens (crossing segment boundaries while
    decoding): each row equals the prompt alone and ``gist_jax.inference.generate``."""
    from gist_jax.inference import generate

    cfg, comp, params, directory = export_dir
    model = _load(directory)
    prompts, new = _prompts(3), 24
    ids, mask = _left_padded(prompts)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)[:, ids.shape[1]:]
    ours = generate(cfg, comp, params, prompts, new, ratio=4, tokenizer_size=259,
                    gist_token_id=259).tokens
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=new, eos_token_id=None)[0, len(p):]
        assert batch[i].tolist() == alone.tolist() == list(ours[i]), i
    no_cache = model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False, eos_token_id=None,
                              pad_token_id=PAD)[:, ids.shape[1]:]
    assert no_cache.tolist() == batch[:, :6].tolist()


def test_sampling_is_seeded_and_never_picks_banned_ids(export_dir):
    _, _, _, directory = export_dir
    model = _load(directory)
    ids, mask = _left_padded(_prompts(4)[:4])

    def sample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_p=0.9,
                             temperature=1.5, eos_token_id=None, pad_token_id=PAD)
        return out[:, ids.shape[1]:].tolist()

    first, again, other = sample(0), sample(0), sample(1)
    assert first == again and first != other
    assert max(max(row) for row in first + other) < 259  # tokenizer ids only, never <gist>


def test_stopping_criteria_max_length_and_labels(export_dir):
    _, _, _, directory = export_dir
    model = _load(directory)
    prompt = torch.tensor([_prompts(5)[4]])

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt.shape[1] + 3, dtype=torch.bool)

    out = model.generate(prompt, max_new_tokens=30, eos_token_id=None,
                         stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == prompt.shape[1] + 3
    assert model.generate(prompt, max_length=prompt.shape[1] + 5, eos_token_id=None).shape[1] == prompt.shape[1] + 5
    with torch.no_grad():
        out = model(prompt, labels=prompt)
    logp = torch.log_softmax(out.logits[0, :-1], -1)
    manual = -logp[torch.arange(prompt.shape[1] - 1), prompt[0, 1:]].mean()
    assert abs(float(out.loss) - float(manual)) < 1e-5
    with pytest.raises(ValueError, match="beam search"):
        model.generate(prompt, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="position_ids"):
        model(prompt, position_ids=torch.arange(prompt.shape[1])[None] + 1)


def test_pipeline_text_generation_batch(export_dir):
    """``pipeline("text-generation")`` over prompts of different lengths in batches of 4 (left
    padding) gives each prompt's own greedy continuation."""
    _, _, _, directory = export_dir
    model = _load(directory)
    tok = transformers.AutoTokenizer.from_pretrained(str(directory), padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = ["x = 1", "def f(a, b):\n    return a + b\n", "import os\nimport sys\n" * 3,
             "The quick brown fox jumps over the lazy dog. " * 2, "for i in range(10):", "#"]
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    outs = pipe(texts, batch_size=4, max_new_tokens=12, do_sample=False, eos_token_id=None, return_full_text=False)
    for text, out in zip(texts, outs):
        ids = tok(text, return_tensors="pt")["input_ids"]
        alone = model.generate(ids, max_new_tokens=12, eos_token_id=None)[0, ids.shape[1]:]
        assert out[0]["generated_text"] == tok.decode(alone, skip_special_tokens=True), text


@pytest.mark.parametrize("variant", ["coarse_kv", "coarse_rec", "unigist"])
def test_every_variant_pads_and_batches_like_alone(export_dir, variant):
    """The same per-row rule for the other memories: a left-padded batch's greedy outputs equal
    each prompt alone (UniGist: a window of one segment)."""
    _, comp, _, directory = export_dir
    model = _load(directory)
    case = (comp.replace(window=L) if variant == "unigist" else _case(comp, variant, "aligned", 4, 4))
    model.config.gist = {**model.config.gist, **case.to_dict(), "inference_ratio": 4}
    prompts = _prompts(6)[1::2]  # 9, 17, 40 and 70 tokens
    ids, mask = _left_padded(prompts)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None,
                           pad_token_id=PAD)[:, ids.shape[1]:]
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10, eos_token_id=None)[0, len(p):]
        assert batch[i].tolist() == alone.tolist(), (variant, i)


def test_compare_hf_batch_check_through_its_command(export_dir):
    """``compare_hf --batch-lengths`` (how docs/results.md checks a real export): one JSON line
    with every row of the padded batch equal to its prompt alone and to gist_jax."""
    import os
    import pathlib
    import subprocess
    import sys

    _, _, _, directory = export_dir
    text = "def f(a, b):\n    return a + b  # a line of code to compress\n" * 8
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "gist_jax.compare_hf", "--hf", str(directory), "--mode", "compressed",
                           "--text", text, "--max-tokens", "64", "--batch-lengths", "5,17,40,70", "--new-tokens", "8"],
                          cwd=pathlib.Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    batch = json.loads(proc.stdout.strip().splitlines()[-1])
    assert batch == {"mode": "batch", "lengths": [5, 17, 40, 70], "new_tokens": 8, "batch_equals_alone": 4,
                     "batch_equals_gist_jax": 4, "prompts": 4}
