"""gist_jax params -> a Hugging Face directory that transformers loads.

What an export holds and why:
  * ``config.json``: the family's transformers config (``families.config_to_hf``) plus a
    ``gist`` section (the compression config) and ``auto_map`` to ``modeling_gist.py``. A plain
    ``AutoModelForCausalLM.from_pretrained`` ignores both and builds the stock Llama/Qwen2 model;
    ``trust_remote_code=True`` builds the compressed-inference subclass.
  * ``model.safetensors`` (or shards + ``model.safetensors.index.json``): base weights under
    transformers' own names and shapes, the embedding and head NOT resized, so the plain model
    is exactly the base model; the gist embedding and gist q/k/v projections as extra
    ``gist.*`` tensors (plain transformers reports them as unused and loads fine).
  * tokenizer files with ``<gist>`` added as a special token. Its id is only a marker: no
    model reads it through ``embed_tokens`` (gist tokens always take the gist embedding), which
    is why the embedding need not grow for it.
  * ``generation_config.json`` and a copy of ``modeling_gist.py``.
The AE decoder and the TIE reference are training-only and never exported.

Arrays are read one at a time (one checkpoint leaf, or one gathered in-memory leaf) and each
transformers tensor is written at its pre-planned offset, so no process holds more than one
leaf of the model at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.params import model_config_for
from gist_jax.hf import families, gist_names
from gist_jax.hf.families import TensorRule
from gist_jax.hf.safetensors_write import PlannedTensor, ShardedWriter, parse_size
from gist_jax.model.config import ConfigError, ModelConfig

MODELING_FILE = pathlib.Path(__file__).with_name("modeling_gist.py")
CLASS_NAMES = {"llama": "GistLlamaForCausalLM", "qwen2": "GistQwen2ForCausalLM"}
LeafPath = tuple[str, ...]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- param sources
class TreeSource:
    """An in-memory params tree (numpy or jax, possibly sharded over hosts)."""

    def __init__(self, params: dict[str, Any]):
        self.leaves = {_path_tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def shape_dtype(self, path: LeafPath) -> tuple[tuple[int, ...], np.dtype]:
        x = self.leaves[path]
        return tuple(x.shape), np.dtype(x.dtype)

    def load(self, path: LeafPath) -> np.ndarray:
        x = self.leaves[path]
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)  # this leaf only
        return np.asarray(jax.device_get(x))


class CheckpointSource:
    """``state.params["model"]`` of an Orbax training checkpoint, restored leaf by leaf on the
    host (any saved sharding; nothing else of the state, e.g. the optimizer, is read)."""

    def __init__(self, state_dir: pathlib.Path):
        import orbax.checkpoint as ocp

        self.state_dir = state_dir
        self._ckpt = ocp.PyTreeCheckpointer()
        meta = self._ckpt.metadata(state_dir)
        tree = getattr(getattr(meta, "item_metadata", None), "tree", meta)
        try:
            model = tree["params"]["model"]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{state_dir} has no params['model'] tree: not a gist_jax training "
                              "checkpoint (pass the run's --workdir or a <workdir>/checkpoints/<step>)") from e
        self.leaves = {_path_tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(model)[0]}

    def shape_dtype(self, path: LeafPath) -> tuple[tuple[int, ...], np.dtype]:
        x = self.leaves[path]
        return tuple(x.shape), np.dtype(x.dtype)

    def load(self, path: LeafPath) -> np.ndarray:
        import orbax.checkpoint as ocp

        item: dict[str, Any] = {}
        args: dict[str, Any] = {}
        node_i, node_a = item, args
        for key in ("params", "model", *path[:-1]):
            node_i, node_a = node_i.setdefault(key, {}), node_a.setdefault(key, {})
        node_i[path[-1]] = 0
        node_a[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        restored = self._ckpt.restore(self.state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        node = restored["params"]["model"]
        for key in path:
            node = node[key]
        return np.asarray(node)


def _path_tuple(path) -> LeafPath:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# ----------------------------------------------------------------------------- tensor plan
@dataclasses.dataclass(frozen=True)
class _Item:
    rule: TensorRule
    leaf: LeafPath
    layer: int | None
    planned: PlannedTensor


def _plan(cfg: ModelConfig, source, dtype: np.dtype | None) -> list[_Item]:
    """Every transformers tensor with the leaf (and layer of a scanned leaf) it comes from."""
    scanned = any(p[0] == "layers" for p in source.leaves)
    items, used = [], set()
    for rule in gist_names.all_rules(cfg):
        leaf, layer = rule.path, None
        if scanned and rule.path[0].startswith("layers_"):
            leaf, layer = ("layers", *rule.path[1:]), int(rule.path[0][len("layers_"):])
        if leaf not in source.leaves:
            raise ConfigError(f"params have no {'/'.join(leaf)} (needed for {rule.hf_name}); the params do "
                              f"not match the {cfg.family} config with {cfg.num_layers} layers")
        used.add(leaf)
        shape, leaf_dtype = source.shape_dtype(leaf)
        if layer is not None:
            shape = shape[1:]
        n = families.head_count(cfg, rule)
        hf_shape = jax.eval_shape(lambda w, n=n, t=rule.transform: families.TRANSFORMS[t].to_hf(w, n),
                                  jax.ShapeDtypeStruct(shape, np.float32)).shape
        items.append(_Item(rule, leaf, layer, PlannedTensor(rule.hf_name, tuple(hf_shape), dtype or leaf_dtype)))
    unused = sorted("/".join(p) for p in set(source.leaves) - used)
    if unused:
        raise ConfigError(f"{len(unused)} params have no transformers name, e.g. {unused[:6]}; the params "
                          "and the model/compression config disagree (is model.gist_projections right?)")
    return items


def write_weights(out: pathlib.Path, cfg: ModelConfig, source, dtype: np.dtype | None = None,
                  shard_size: str | int = "2GB", primary: bool = True) -> list[str]:
    """Write the safetensors files of ``source``; every process loads (gathers) the leaves in
    the same order, only ``primary`` writes."""
    items = _plan(cfg, source, dtype)
    writer = ShardedWriter(out, [i.planned for i in items], parse_size(shard_size)) if primary else None
    for leaf, group in itertools.groupby(sorted(items, key=lambda i: i.leaf), key=lambda i: i.leaf):
        array = source.load(leaf)
        for item in group:
            x = array if item.layer is None else array[item.layer]
            hf = families.TRANSFORMS[item.rule.transform].to_hf(x, families.head_count(cfg, item.rule))
            if writer is not None:
                writer.write(item.rule.hf_name, np.asarray(hf).astype(item.planned.dtype))
        del array
    return writer.close() if writer is not None else []


# ----------------------------------------------------------------------------- tokenizer
def _hf_tokenizer(spec: str):
    """An ``HFTokenizer`` (a fresh copy: the spec cache must not see ``<gist>``) or None."""
    import tokenizers

    from gist_jax.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_spec

    tok = tokenizer_from_spec(spec)
    if isinstance(tok, HFTokenizer):
        return HFTokenizer(tokenizers.Tokenizer.from_str(tok.tokenizer.to_str()), bos_token=tok.bos_token,
                           eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
                           add_bos=tok.add_bos, add_eos=tok.add_eos, chat_template=tok.chat_template)
    if isinstance(tok, ByteTokenizer):
        return _byte_tokenizer()
    logger.warning("data.tokenizer=%r has no tokenizer.json form; the export has no tokenizer files "
                   "(copy the tokenizer next to it by hand)", spec)
    return None


def _byte_tokenizer():
    """``ByteTokenizer`` as an HF tokenizer with the same ids (bytes 0..255, pad/bos/eos)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from gist_jax.tokenizer import ByteTokenizer, HFTokenizer, bytes_to_unicode

    spelling = bytes_to_unicode()
    tok = tokenizers.Tokenizer(models.BPE(vocab={spelling[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = {ByteTokenizer.pad_id: "<pad>", ByteTokenizer.bos_id: "<s>", ByteTokenizer.eos_id: "</s>"}
    tok.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in sorted(names)])
    return HFTokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_tokenizer(spec: str | None, out: pathlib.Path, with_gist: bool) -> tuple[int | None, int | None]:
    """Tokenizer files with ``<gist>`` added; returns the ``<gist>`` id and the written
    tokenizer's size, ``<gist>`` included (None, None: no tokenizer). Generation needs the
    size: LM-head rows at or beyond it (a padded vocabulary) are never sampled. The size is
    the largest id + 1, so a tokenizer with unused ids in between never loses a real one."""
    from tokenizers import AddedToken

    tok = _hf_tokenizer(spec) if spec else None
    if tok is None:
        return None, None
    gist_id = None
    if with_gist:
        if tok.tokenizer.token_to_id(gist_names.GIST_TOKEN) is None:
            tok.tokenizer.add_special_tokens([AddedToken(gist_names.GIST_TOKEN, special=True, normalized=False)])
        gist_id = tok.tokenizer.token_to_id(gist_names.GIST_TOKEN)
    tok.save_pretrained(out)
    return gist_id, max(tok.tokenizer.get_vocab(with_added_tokens=True).values()) + 1


# ----------------------------------------------------------------------------- whole directory
def _export(cfg: ModelConfig, comp: CompressionConfig, source, tokenizer_spec: str | None,
            out_dir: str | pathlib.Path, dtype: str | None, shard_size: str | int) -> pathlib.Path:
    from gist_jax.distributed import is_primary

    out = pathlib.Path(out_dir).absolute()
    primary = is_primary()
    if primary:
        if (out / "config.json").exists():
            raise FileExistsError(f"{out} already holds an export; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    if cfg.family == "llama" and cfg.qkv_bias:
        raise ConfigError("a llama-family model with q/k/v biases has no transformers equivalent")
    np_dtype = np.dtype(jax.numpy.dtype(dtype)) if dtype else None
    write_weights(out, cfg, source, np_dtype, shard_size, primary)
    if not primary:
        return out
    gist_id, tokenizer_size = write_tokenizer(tokenizer_spec, out, with_gist=comp.enabled)
    if comp.enabled:
        shutil.copyfile(MODELING_FILE, out / MODELING_FILE.name)
    stored = np_dtype or source.shape_dtype(next(iter(source.leaves)))[1]
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    hf = families.config_to_hf(cfg.replace(num_gist_embeddings=0, gist_projections=False))
    hf["dtype"] = str(jax.numpy.dtype(stored))
    if comp.enabled:
        # modeling_gist.generate never samples ids >= tokenizer_vocab_size (nor the gist id).
        hf["gist"] = {**gist_names.gist_section(cfg, comp, gist_id), "tokenizer_vocab_size": tokenizer_size}
        hf["auto_map"] = {"AutoModelForCausalLM": f"modeling_gist.{CLASS_NAMES[cfg.family]}"}
    tmp = out / "config.json.tmp"  # written last: a directory without config.json is incomplete
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    tmp.rename(out / "config.json")
    return out


def export_params(model_cfg: ModelConfig, comp_cfg: CompressionConfig, params: dict[str, Any],
                  tokenizer_spec: str | None, out_dir: str | pathlib.Path, *, dtype: str | None = None,
                  shard_size: str | int = "2GB") -> pathlib.Path:
    """Export an in-memory params tree (``state.params`` or its ``"model"`` part; scanned or
    not; numpy or jax, sharded over any mesh) to ``out_dir``. ``model_cfg`` may be the base or
    the gist model config; ``tokenizer_spec`` is a ``data.tokenizer`` spec (None: no tokenizer
    files). Every process must call it (leaves are gathered collectively); only the primary
    writes. ``dtype`` (e.g. "bfloat16") casts the stored tensors; default: as the params."""
    if "model" in params and "embed" not in params:
        params = params["model"]  # the TrainState tree; the AE decoder is not exported
    cfg = model_config_for(model_cfg, comp_cfg).replace(scan_layers="layers" in params)
    return _export(cfg, comp_cfg, TreeSource(params), tokenizer_spec, out_dir, dtype, shard_size)


# ----------------------------------------------------------------------------- checkpoints
def resolve_step_dir(path: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
    """A run's --workdir, its ``checkpoints`` dir or one ``<step>`` dir -> the step directory
    (newest step unless ``step`` is given)."""
    path = pathlib.Path(path).absolute()
    if (path / "state").is_dir() and (path / "run").is_dir():
        if step is not None and path.name != str(step):
            raise ConfigError(f"--checkpoint={path} is step {path.name} but --step={step}; pass the workdir")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"--checkpoint={path}: no finished checkpoints (<step>/state) under {root}")
    if step is None:
        return root / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"--step={step} is not in {root}; available steps: {steps}")
    return root / str(step)


def base_model_config(model_section: dict[str, Any]) -> ModelConfig:
    """The base ModelConfig a run started from (``model.init``), without reading any weights."""
    kind, where = model_section["init"].split(":", 1)
    if kind == "preset":
        from gist_jax.model.config import preset

        cfg = preset(where)
    elif kind == "gguf":
        import gguf

        from gist_jax.hf.gguf import hf_config_from_metadata, smollm2_gguf_path

        reader = gguf.GGUFReader(str(smollm2_gguf_path() if where == "smollm2" else where))
        metadata = {k: f.contents() for k, f in reader.fields.items()}
        cfg = families.config_from_hf(hf_config_from_metadata(metadata, [t.name for t in reader.tensors]))
    elif kind == "hf":
        cfg = families.config_from_hf(json.loads((pathlib.Path(where) / "config.json").read_text()))
    else:
        from gist_jax.params_io import CONFIG_FILE

        cfg = ModelConfig.from_dict(json.loads((pathlib.Path(where) / CONFIG_FILE).read_text())["model"])
    overrides = {k: model_section[k] for k in ("dtype", "param_dtype") if model_section.get(k)}
    return cfg.replace(**overrides)


def checkpoint_configs(step_dir: pathlib.Path, run: dict[str, Any] | None = None
                       ) -> tuple[ModelConfig, CompressionConfig, dict[str, Any]]:
    """(gist model config, compression config, run dict) of a training checkpoint, checked
    against the layout it recorded. ``run``: the stored run dict with a tool's overrides
    (``cli_config.checkpoint_run``, e.g. a moved ``model.init``); default: as stored."""
    from gist_jax.train.checkpoint import LAYOUT_KEYS

    if run is None:
        run = json.loads((step_dir / "run" / "metadata").read_text())
    layout = json.loads((step_dir / "layout" / "metadata").read_text())
    comp = CompressionConfig(**run["compression"])
    cfg = model_config_for(base_model_config(run["model"]), comp).replace(scan_layers=layout["scan_layers"])
    diff = {k: (getattr(cfg, k), layout[k]) for k in LAYOUT_KEYS if k in layout and getattr(cfg, k) != layout[k]}
    if diff:
        raise ConfigError(f"{step_dir}: model.init={run['model']['init']!r} now describes a different model than "
                          f"the checkpoint ({diff}); restore the base model the run used")
    return cfg, comp, run


def export_checkpoint(checkpoint_dir_or_workdir: str | pathlib.Path, out_dir: str | pathlib.Path,
                      step: int | None = None, *, dtype: str | None = None,
                      shard_size: str | int = "2GB", run: dict[str, Any] | None = None) -> pathlib.Path:
    """Export a training checkpoint (newest step, or ``step``) to a transformers directory
    (``run``: the stored run config with overrides, see ``checkpoint_configs``)."""
    step_dir = resolve_step_dir(checkpoint_dir_or_workdir, step)
    cfg, comp, run = checkpoint_configs(step_dir, run)
    tokenizer = (run.get("data") or {}).get("tokenizer")
    return _export(cfg, comp, CheckpointSource(step_dir / "state"), tokenizer, out_dir, dtype, shard_size)
