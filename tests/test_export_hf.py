"""Export to Hugging Face: transformers loads it, modeling_gist.py matches gist_jax, round trips.

Tiny random float32 models (2 layers, width 64, segments of 16 tokens) in every family:
Llama with tied embeddings and one shared gist embedding, Qwen2 (q/k/v biases) with per-slot
gist embeddings and Beacon gist projections, Mistral with Beacon projections without biases.
Params are perturbed away from their init (gist rows differ from EOS, gist projections from the
base ones) so that a dropped or misplaced gist tensor changes the logits.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gist_jax import families
from gist_jax.data.tokenizer import hf_tokenizer_copy
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.params import model_config_for
from gist_jax.gist.specs import layout_arrays
from gist_jax.hf import export
from gist_jax.hf.importer import load_gist_hf_dir, load_hf_dir
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import forward, init_params
from gist_jax.train.hf_export import export_checkpoint

L = 16
FAMILIES = {
    "llama": dict(model=dict(family="llama", tie_embeddings=True),
                  comp=dict(gist_embedding="shared", gist_projections=False, ratios=(4, 8),
                            ratio_sampling="per_instance")),
    "qwen2": dict(model=dict(family="qwen2", qkv_bias=True, tie_embeddings=False),
                  comp=dict(gist_embedding="per_slot", gist_projections=True, ratios=(4,), ratio_sampling="fixed")),
    # Beacon projections without biases (the base has none): modeling_gist reads that off the base model.
    "mistral": dict(model=dict(family="mistral", tie_embeddings=False),
                    comp=dict(gist_embedding="shared", gist_projections=True, ratios=(4,), ratio_sampling="fixed")),
}
VARIANTS = {"fine_kv": dict(memory="kv", granularity="fine"), "coarse_kv": dict(memory="kv", granularity="coarse"),
            "coarse_rec": dict(memory="recurrent", granularity="coarse")}


def tiny_model(family: str, vocab_size: int = 128) -> tuple[ModelConfig, CompressionConfig, dict]:
    spec = FAMILIES[family]
    base = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, dtype="float32", **spec["model"])
    comp = CompressionConfig(segment_length=L, num_sinks=4, **spec["comp"])
    cfg = model_config_for(base, comp)
    params = init_params(cfg, jax.random.key(0))
    leaves, treedef = jax.tree.flatten_with_path(params)
    rng = np.random.default_rng(list(FAMILIES).index(family) + 1)
    new = []
    for path, x in leaves:
        noise = rng.normal(size=x.shape).astype(np.float32)
        is_scale = "scale" in jax.tree_util.keystr(path)
        new.append(jnp.asarray(1 + 0.1 * noise if is_scale else 0.15 * noise))
    return cfg, comp, jax.tree.unflatten(treedef, new)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (cfg, comp, params, export dir); the Qwen2 export is sharded."""
    out = {}
    for family in FAMILIES:
        cfg, comp, params = tiny_model(family)
        directory = tmp_path_factory.mktemp(family) / "hf"
        export.export_params(cfg, comp, params, hf_tokenizer_copy("bytes") if family == "llama" else None, directory,
                             shard_size="40KB" if family == "qwen2" else "2GB")
        out[family] = (cfg, comp, params, directory)
    return out


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 128, size=(2, n)).astype(np.int32)


def _gist_model(directory: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, dtype=torch.float32, attn_implementation="eager").eval()


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jax_logits(cfg, comp, shape, params, tokens, arrays):
    return compressed_logits(cfg, comp, shape, params, tokens, arrays)


def jax_raw_logits(cfg, comp, params, tokens: np.ndarray) -> np.ndarray:
    """gist_jax's compressed forward (parallel KV / recurrent scan), logits of the raw tokens.
    Granularity and position scheme are layout data, so they share one compilation."""
    comp = comp.replace(pad_to_segments=True)
    layout = build_layout(tokens.shape[1], comp)
    padded = np.zeros((tokens.shape[0], layout.padded_raw), np.int32)
    padded[:, :tokens.shape[1]] = tokens
    canonical = comp.replace(granularity="coarse" if comp.memory == "recurrent" else "fine", positions="compressed")
    logits = _jax_logits(cfg, canonical, layout.shape, params, jnp.asarray(padded), layout_arrays(layout))
    return np.asarray(logits)[:, layout.live_raw_positions()]


def _case(comp: CompressionConfig, variant: str, positions: str, sinks: int, ratio: int) -> CompressionConfig:
    return comp.replace(**VARIANTS[variant], positions=positions, num_sinks=sinks, ratios=(ratio,),
                        ratio_sampling="fixed")


def _set_gist(model, case: CompressionConfig, ratio: int) -> None:
    model.config.gist = {**model.config.gist, **case.to_dict(), "inference_ratio": ratio}


# ----------------------------------------------------------------------------- files and plain load
def test_export_files_and_plain_transformers_parity(exported):
    for family, (cfg, _comp, params, directory) in exported.items():
        names = sorted(p.name for p in directory.iterdir())
        assert {"config.json", "generation_config.json", "modeling_gist.py"} <= set(names)
        hf_config = json.loads((directory / "config.json").read_text())
        assert hf_config["gist"]["segment_length"] == L and hf_config["auto_map"]
        if family == "qwen2":
            assert "model.safetensors.index.json" in names and len(list(directory.glob("model-*"))) > 1
        else:
            assert "model.safetensors" in names
        if family == "llama":
            assert "tokenizer.json" in names
            tok = transformers.AutoTokenizer.from_pretrained(str(directory))
            assert tok.convert_tokens_to_ids("<gist>") == hf_config["gist"]["gist_token_id"] == 259
            assert tok("hi")["input_ids"][-2:] == [104, 105]
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        assert type(plain).__name__ == families.family_for(family).hf_class
        tokens = _tokens(40)
        with torch.no_grad():
            theirs = plain(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        base_cfg = cfg.replace(num_gist_embeddings=0, gist_projections=False)
        base = {k: v for k, v in params.items() if k != "gist_embedding"}
        base["layers"] = dict(base["layers"], attn={k: v for k, v in base["layers"]["attn"].items()
                                                    if not k.startswith("gist_")})
        ours = np.asarray(forward(base_cfg, base, jnp.asarray(tokens)))
        assert np.abs(theirs).max() > 0.5
        assert np.abs(ours - theirs).max() <= 1e-4, family


# ----------------------------------------------------------------------------- compressed parity
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compressed_forward_matches_gist_jax(exported, family, variant):
    """Both position schemes x sinks 0/4, 4 whole segments (3 boundaries) plus an unfinished one."""
    cfg, comp, params, directory = exported[family]
    model = _gist_model(directory)
    tokens = _tokens(4 * L + 7, seed=3)
    ratio = comp.ratios[-1]
    worst = 0.0
    for positions in ("compressed", "aligned"):
        for sinks in (0, 4):
            case = _case(comp, variant, positions, sinks, ratio)
            _set_gist(model, case, ratio)
            theirs = model.compressed_forward(torch.from_numpy(tokens.astype(np.int64))).numpy()
            ours = jax_raw_logits(cfg, case, params, tokens)
            assert theirs.shape == ours.shape == (2, tokens.shape[1], cfg.vocab_size)
            diff = float(np.abs(ours - theirs).max())
            assert diff <= 1e-4, (positions, sinks, diff)
            worst = max(worst, diff)
            # Compression matters: later segments differ from the uncompressed model.
            with torch.no_grad():
                full = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), compressed=False).logits.numpy()
            assert np.abs(full[:, 2 * L:] - theirs[:, 2 * L:]).max() > 1e-2
    assert worst < 1e-4


def test_gist_tensors_are_used(exported):
    """Negative control: zeroing the loaded gist embedding changes the compressed logits."""
    _, _, _, directory = exported["qwen2"]
    model = _gist_model(directory)
    tokens = torch.from_numpy(_tokens(2 * L).astype(np.int64))
    before = model.compressed_forward(tokens)
    with torch.no_grad():
        model.gist.layers[0].k_proj.weight.mul_(0.5)
    assert (model.compressed_forward(tokens) - before).abs().max() > 1e-3
    model.config.gist = {**model.config.gist, "gist_token_id": 7}
    with pytest.raises(ValueError, match="<gist> marker"):
        model.compressed_forward(tokens[:, :3] * 0 + 7)


# ----------------------------------------------------------------------------- generation
def jax_greedy(cfg, comp, params, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Re-run gist_jax's compressed forward over the growing sequence, argmax of the last token."""
    seq = prompt.copy()
    for _ in range(steps):
        next_ids = jax_raw_logits(cfg, comp, params, seq)[:, -1].argmax(-1).astype(np.int32)
        seq = np.concatenate([seq, next_ids[:, None]], axis=1)
    return seq


@pytest.mark.parametrize("family,variant,positions", [("qwen2", "fine_kv", "compressed"),
                                                      ("qwen2", "coarse_rec", "aligned"),
                                                      ("llama", "coarse_kv", "compressed")])
def test_greedy_generation_matches(exported, family, variant, positions):
    cfg, comp, params, directory = exported[family]
    model = _gist_model(directory)
    ratio = comp.ratios[0]
    case = _case(comp, variant, positions, 4, ratio)
    _set_gist(model, case, ratio)
    prompt = _tokens(L + 5, seed=4)[:1]
    theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=32, eos_token_id=None).numpy()
    ours = jax_greedy(cfg, case, params, prompt, 32)
    assert theirs.shape == (1, L + 5 + 32)
    np.testing.assert_array_equal(theirs, ours)


# ----------------------------------------------------------------------------- padded vocabulary
BYTE_IDS, GIST_ID, PADDED_VOCAB = 259, 259, 272  # byte tokenizer ids 0..258; <gist> next; LM head


@pytest.fixture(scope="module")
def padded_vocab_export(tmp_path_factory):
    """A Qwen2 whose LM head (272 rows) is larger than its byte tokenizer (259 ids + ``<gist>``
    at 259), as Qwen2's padded vocabulary is. The head rows of the gist id and beyond the
    tokenizer are +-100 times unit vectors, so on any hidden state one of them has the largest
    logit: unmasked greedy decoding would pick one at every step."""
    cfg, comp, params = tiny_model("qwen2", vocab_size=PADDED_VOCAB)
    banned = np.arange(PADDED_VOCAB - 1, GIST_ID - 1, -1)  # the gist id last: +e_6, picked most
    kernel_ExV = np.asarray(params["lm_head"]["kernel"]).copy()
    kernel_ExV[:, banned] = 0.0
    kernel_ExV[np.arange(len(banned)) // 2, banned] = 100.0 * (1 - 2 * (np.arange(len(banned)) % 2))
    params = {**params, "lm_head": {"kernel": jnp.asarray(kernel_ExV)}}
    directory = tmp_path_factory.mktemp("padded") / "hf"
    export.export_params(cfg, comp, params, hf_tokenizer_copy("bytes"), directory)
    return cfg, comp, params, directory


def test_generation_never_picks_gist_or_beyond_tokenizer(padded_vocab_export):
    """Both generators exclude the ``<gist>`` id and ids beyond the tokenizer (the export records
    ``tokenizer_vocab_size``) and agree token for token. The model's own argmax is one of them
    almost everywhere: the exported ``generate`` raised ValueError on feeding ``<gist>`` back,
    and ``gist_jax.inference`` returned such ids."""
    from gist_jax.inference import generate

    cfg, comp, params, directory = padded_vocab_export
    section = json.loads((directory / "config.json").read_text())["gist"]
    assert (section["gist_token_id"], section["tokenizer_vocab_size"]) == (GIST_ID, BYTE_IDS + 1)
    model = _gist_model(directory)
    case = _case(comp, "fine_kv", "compressed", 4, 4)
    _set_gist(model, case, 4)
    prompt = _tokens(L + 5, seed=6)[:1]
    new = 2 * L  # crosses two segment boundaries while decoding
    theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=new).numpy()[0, L + 5:]
    ours = generate(cfg, case, params, prompt.tolist(), new, tokenizer_size=BYTE_IDS,
                    gist_token_id=GIST_ID, record_logits=True)
    np.testing.assert_array_equal(theirs, ours.tokens[0])
    assert len(ours.tokens[0]) == new and max(ours.tokens[0]) < BYTE_IDS
    unmasked = ours.logits[0].argmax(-1)  # the model's own pick after every raw token
    assert (unmasked == GIST_ID).any() and (unmasked > GIST_ID).any() and (unmasked >= GIST_ID).mean() > 0.9


# ----------------------------------------------------------------------------- round trip
def test_round_trip_is_byte_identical(exported, tmp_path):
    for family, (cfg, comp, params, directory) in exported.items():
        cfg2, comp2, params2 = load_gist_hf_dir(directory, dtype="float32")
        assert comp2 == comp
        assert cfg2 == cfg
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
            np.testing.assert_array_equal(np.asarray(a), b)
        spec = f"hf:{directory}" if (directory / "tokenizer.json").exists() else None
        tok = hf_tokenizer_copy(spec) if spec else None
        again = export.export_params(cfg2, comp2, params2, tok, tmp_path / family,
                                     shard_size="40KB" if family == "qwen2" else "2GB")
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        assert files == sorted(p.name for p in again.glob("*.safetensors"))
        for name in files:
            assert (directory / name).read_bytes() == (again / name).read_bytes(), name
        # the plain importer still reads an export (base model only)
        base_cfg, _ = load_hf_dir(directory)
        assert base_cfg.num_gist_embeddings == 0


def test_sharded_params_export_the_same_bytes(exported, tmp_path):
    """An in-memory tree sharded over 8 devices and unscanned exports byte-identically."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from gist_jax.model.transformer import unstack_layers

    cfg, comp, params, directory = exported["llama"]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("fsdp",))

    def place(x):
        spec = PartitionSpec("fsdp") if x.shape[0] % 8 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree.map(place, unstack_layers(params))
    out = export.export_params(cfg, comp, {"model": sharded, "ae": {"unused": np.zeros(3)}},
                             hf_tokenizer_copy("bytes"), tmp_path / "s")
    assert (out / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()


def test_refuses_overwrite_and_mismatched_params(exported, tmp_path):
    cfg, comp, params, directory = exported["llama"]
    with pytest.raises(FileExistsError, match="already holds an export"):
        export.export_params(cfg, comp, params, None, directory)
    with pytest.raises(ValueError, match="gist_embedding"):
        export.export_params(cfg, comp.replace(memory="none", trainable="all"), params, None, tmp_path / "x")


@pytest.mark.parametrize("variant", ["fine_kv", "coarse_rec"])
def test_sinks_spanning_gists(exported, variant):
    """Ratio 2 < 4 sinks: in Fine-KV a gist sits between the sinks, whose memory position is
    still their raw index (an inference ratio other than the training ones, shared embedding)."""
    cfg, comp, params, directory = exported["llama"]
    model = _gist_model(directory)
    case = _case(comp, variant, "compressed", 4, 2)
    _set_gist(model, case, 2)
    tokens = _tokens(3 * L + 3, seed=5)
    theirs = model.compressed_forward(torch.from_numpy(tokens.astype(np.int64))).numpy()
    assert np.abs(jax_raw_logits(cfg, case, params, tokens) - theirs).max() <= 1e-4


# ----------------------------------------------------------------------------- real checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real tiny training run (preset:tiny Llama, bytes, Fine-KV + AE + TIE, 8 fake devices,
    unscanned layers): 2 steps, checkpointed at step 2, exported by the loop after each step."""
    import run_helpers

    workdir = tmp_path_factory.mktemp("run") / "work"
    result = run_helpers.run(workdir, str(tmp_path_factory.mktemp("tokens")), "--config.optimizer.total_steps=2",
                             "--config.train.eval_every=0", "--config.train.eval_at_start=False",
                             "--config.model.scan_layers=False", "--config.checkpoint.export_hf_every=1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return workdir


def test_export_trained_checkpoint_cli(trained_run, tmp_path):
    from gist_jax import export_hf
    from gist_jax.train.step_reader import ModelParamsReader, checkpoint_configs, resolve_step_dir

    out = tmp_path / "hf"
    assert export_hf.main(["--checkpoint", str(trained_run), "--out", str(out), "--shard-size", "100KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    step_dir = resolve_step_dir(trained_run)
    _, comp, _ = checkpoint_configs(step_dir)
    source = ModelParamsReader(step_dir)
    assert not any(p[0] == "ae" for p in source.leaves)  # the AE decoder is not exported
    cfg2, comp2, params = load_gist_hf_dir(out, dtype="float32")
    assert comp2 == comp and cfg2.num_gist_embeddings == 1
    for path in source.leaves:  # the export holds exactly the trained params
        node, leaf = params, source.load(path)
        if path[0].startswith("layers_"):
            node = jax.tree.map(lambda x, i=int(path[0][7:]): x[i], params["layers"])
            path = path[1:]
        for key in path:
            node = node[key]
        np.testing.assert_array_equal(np.asarray(node), leaf)
    tokens = np.frombuffer(b"def export(self): return self.params  # " * 2, np.uint8)[None, :72].astype(np.int32)
    model = _gist_model(out)
    theirs = model.compressed_forward(torch.from_numpy(tokens.astype(np.int64))).numpy()
    ours = jax_raw_logits(cfg2, comp2.replace(ratios=(4,), ratio_sampling="fixed"), params, tokens)
    assert np.abs(ours - theirs).max() <= 1e-4
    with pytest.raises(FileNotFoundError, match="available steps"):
        export_checkpoint(trained_run, tmp_path / "other", step=7)


def test_training_loop_exports_every_n_steps(trained_run, tmp_path):
    """``checkpoint.export_hf_every`` writes <workdir>/hf/<step>; the final one is the same bytes
    as exporting the final checkpoint afterwards."""
    assert sorted(p.name for p in (trained_run / "hf").iterdir()) == ["1", "2"]
    out = export_checkpoint(trained_run, tmp_path / "after")
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (trained_run / "hf" / "2" / name).read_bytes(), name


def test_reading_a_checkpoint_logs_no_orbax_metadata_warning(trained_run, tmp_path, caplog):
    """Evaluation and export read a step through ``train.checkpoint`` (Orbax's handlers), not
    ``PyTreeCheckpointer.metadata(<step>/state)``, which logs "Metadata file does not exist"
    for the per-item ``_CHECKPOINT_METADATA`` a CheckpointManager never writes."""
    import logging

    import orbax.checkpoint as ocp

    from gist_jax.evaluate.common import load_checkpoint
    from gist_jax.train.step_reader import resolve_step_dir

    caplog.set_level(logging.INFO)
    ocp.PyTreeCheckpointer().metadata(resolve_step_dir(trained_run) / "state")  # the old way, to show it is caught
    assert "does not exist" in caplog.text
    caplog.clear()
    load_checkpoint(trained_run)
    export_checkpoint(trained_run, tmp_path / "hf")
    assert "does not exist" not in caplog.text
    assert "_CHECKPOINT_METADATA" not in caplog.text
