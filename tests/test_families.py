"""The family registry: every family's HF config round trip, its transformers class, its refusals.

HF parity of each family's forward is ``test_hf_parity`` (``tiny_hf.MODELS``); its export and
compressed inference through ``modeling_gist`` is ``test_export_hf``.
"""

from __future__ import annotations

import pytest
import transformers

from gist_jax import families
from gist_jax.errors import ConfigError
from gist_jax.hf import modeling_gist
from gist_jax.model.config import ModelConfig, RopeScaling

# A reach past Mistral's default 4096-token window: the export must say "no window" explicitly.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2)


def _config(name: str) -> ModelConfig:
    return ModelConfig(family=name, qkv_bias=name == "qwen2", tie_embeddings=name == "llama",
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64) if name == "llama" else RopeScaling(),
                       **TINY)


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_config_round_trip_through_transformers(name):
    """ModelConfig -> config.json -> transformers' own config class -> back: nothing lost, and
    transformers reads every key we write (its class is the family's)."""
    cfg = _config(name)
    hf = families.config_to_hf(cfg)
    assert hf["model_type"] == name and hf["architectures"] == [families.FAMILIES[name].hf_class]
    theirs = transformers.AutoConfig.for_model(**hf).to_dict()
    for source in (hf, theirs):
        assert families.config_from_hf(source) == cfg
    assert getattr(transformers, families.FAMILIES[name].hf_class).config_class.model_type == name


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_export_class_is_built_over_the_family_class(name):
    family = families.FAMILIES[name]
    cls = getattr(modeling_gist, family.export_class)
    assert cls.__name__ == family.export_class and cls is getattr(modeling_gist, family.export_class)
    assert issubclass(cls, getattr(transformers, family.hf_class))
    assert issubclass(cls, modeling_gist.GistCompressionMixin)
    with pytest.raises(AttributeError):
        modeling_gist.GistNoSuchModelForCausalLM  # noqa: B018


@pytest.mark.parametrize("hf_changes,match", [
    (dict(model_type="gpt2"), r"HF model_type='gpt2' is not supported; supported families: \['llama', 'mistral'"),
    (dict(model_type="mistral", sliding_window=256), (r"sliding_window=256 is not supported .* >= "
                                                     r"max_position_embeddings=32768")),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=True is not supported"),
    (dict(model_type="llama", attention_bias=True), "attention_bias=True is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
])
def test_unsupported_hf_configs_fail_in_one_line(hf_changes, match):
    hf = {**families.config_to_hf(_config("mistral")), **hf_changes}
    with pytest.raises(ConfigError, match=match):
        families.config_from_hf(hf)


def test_sliding_window_covering_every_position_is_plain_causal():
    hf = {**families.config_to_hf(_config("mistral")), "sliding_window": 32768}
    assert families.config_from_hf(hf) == _config("mistral")


@pytest.mark.parametrize("name,changes,match", [
    ("llama", dict(qkv_bias=True), "llama-family model with q/k/v biases"),
    ("mistral", dict(qkv_bias=True), "mistral-family model with q/k/v biases"),
    ("qwen2", dict(qkv_bias=False), "qwen2-family model without q/k/v biases"),
])
def test_configs_transformers_cannot_load_are_refused(name, changes, match):
    with pytest.raises(ConfigError, match=match):
        families.FAMILIES[name].check_export(_config(name).replace(**changes))


def test_unknown_family_label_names_the_key():
    with pytest.raises(ConfigError, match=r"model.family='gpt2' is not supported; supported families"):
        families.config_to_hf(_config("llama").replace(family="gpt2"))


def test_gguf_architectures():
    assert families.gguf_family("llama").name == "llama" and families.gguf_family("llama").gguf_permuted_qk
    assert families.gguf_family("qwen2").name == "qwen2" and not families.gguf_family("qwen2").gguf_permuted_qk
    with pytest.raises(ValueError, match=r"Unsupported GGUF architecture 'mistral'; supported: \['llama', 'qwen2'\]"):
        families.gguf_family("mistral")
