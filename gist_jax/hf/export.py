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

This module writes; it never reads a training checkpoint, so the training loop's export hook
can use it without the hf layer importing train. Exporting a checkpoint (step resolution, its
stored configs, a verified leaf-by-leaf restore) is ``gist_jax.train.hf_export``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np

from gist_jax import families
from gist_jax.errors import ConfigError
from gist_jax.families import TensorRule
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.params import model_config_for
from gist_jax.hf import gist_names
from gist_jax.hf.safetensors_write import PlannedTensor, ShardedWriter, parse_size
from gist_jax.model.config import ModelConfig

MODELING_FILE = pathlib.Path(__file__).with_name("modeling_gist.py")
LeafPath = tuple[str, ...]



# ----------------------------------------------------------------------------- param sources
class ParamSource(Protocol):
    """Where exported arrays come from: an in-memory tree (``TreeSource``) or a training
    checkpoint read leaf by leaf (``train.step_reader.ModelParamsReader``)."""

    @property
    def leaves(self) -> Mapping[LeafPath, Any]: ...

    def shape_dtype(self, path: LeafPath) -> tuple[tuple[int, ...], np.dtype]: ...

    def load(self, path: LeafPath) -> np.ndarray: ...


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


def _path_tuple(path: Any) -> LeafPath:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# ----------------------------------------------------------------------------- tensor plan
@dataclasses.dataclass(frozen=True)
class _Item:
    rule: TensorRule
    leaf: LeafPath
    layer: int | None
    planned: PlannedTensor


def _plan(cfg: ModelConfig, source: ParamSource, dtype: np.dtype | None) -> list[_Item]:
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


def write_weights(out: pathlib.Path, cfg: ModelConfig, source: ParamSource, dtype: np.dtype | None = None,
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
def write_tokenizer(tok: Any | None, out: pathlib.Path, with_gist: bool) -> tuple[int | None, int | None]:
    """Tokenizer files of ``tok`` with ``<gist>`` added (to ``tok`` itself: pass a copy,
    ``data.tokenizer.hf_tokenizer_copy(spec)``); returns the ``<gist>`` id and the written
    tokenizer's size, ``<gist>`` included (None, None: no tokenizer). Generation needs the
    size: LM-head rows at or beyond it (a padded vocabulary) are never sampled. The size is
    the largest id + 1, so a tokenizer with unused ids in between never loses a real one."""
    from tokenizers import AddedToken

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
def check_export_dir(out_dir: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """``out_dir`` may receive an export: it does not exist, is an empty directory, or holds an
    earlier export and ``overwrite`` is set. ``FileExistsError`` (one line naming the fix)
    otherwise; a directory of other files is never replaced."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out={out} is a file; give a directory (it is created if missing)")
    if (out / "config.json").exists():
        if not overwrite:
            raise FileExistsError(f"--out={out} already holds an export; choose another --out, or pass --overwrite "
                                  "to replace it")
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out={out} holds other files (no export's config.json); give a new or empty "
                              "directory")
    return out


def _partial_dir(out: pathlib.Path) -> pathlib.Path:
    """Where an export is written before it is renamed to ``out``: beside it, so the rename is
    atomic (one filesystem), and hidden, so nothing takes a half-written export for one."""
    return out.parent / f".{out.name}.partial"


def export_source(cfg: ModelConfig, comp: CompressionConfig, source: ParamSource, tokenizer: Any | None,
                  out_dir: str | pathlib.Path, dtype: str | None, shard_size: str | int,
                  overwrite: bool = False) -> pathlib.Path:
    """The whole directory from a params ``source``: anything with ``leaves`` (leaf path ->
    metadata), ``shape_dtype(path)`` and ``load(path)``, e.g. ``TreeSource`` or a training
    checkpoint's ``train.step_reader.ModelParamsReader``.

    Written to ``.<out>.partial`` and renamed to ``out`` when complete: an export cut short (a
    kill, a full disk, a damaged checkpoint leaf found mid-way) leaves no ``out`` at all, and the
    next export removes the partial one. ``overwrite`` replaces an earlier export in ``out``."""
    out = pathlib.Path(out_dir).absolute()
    primary = jax.process_index() == 0  # process 0 writes (gist_jax.train.distributed.is_primary)
    families.family_for(cfg.family).check_export(cfg)
    partial = _partial_dir(out)
    if primary:
        check_export_dir(out, overwrite)
        if partial.exists():
            shutil.rmtree(partial)  # what an earlier export cut short left
        partial.mkdir(parents=True)
    np_dtype = np.dtype(jax.numpy.dtype(dtype)) if dtype else None
    try:
        write_weights(partial, cfg, source, np_dtype, shard_size, primary)
        if primary:
            _write_rest(cfg, comp, source, tokenizer, partial, np_dtype)
    except BaseException:
        if primary:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if primary:
        if out.exists():  # empty, or an earlier export that overwrite replaces
            shutil.rmtree(out)
        partial.rename(out)
    return out


def _write_rest(cfg: ModelConfig, comp: CompressionConfig, source: ParamSource, tokenizer: Any | None,
                out: pathlib.Path, np_dtype: np.dtype | None) -> None:
    """Tokenizer, modeling file, generation config and (last) ``config.json`` of an export."""
    gist_id, tokenizer_size = write_tokenizer(tokenizer, out, with_gist=comp.enabled)
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
        hf["auto_map"] = {"AutoModelForCausalLM": f"modeling_gist.{families.family_for(cfg.family).export_class}"}
        # Top-level so from_pretrained(..., gist_forward="full", gist_ratio=8) and lm-eval's
        # --model_args set them: the forward is compressed unless asked, at the export's ratio.
        hf["gist_forward"], hf["gist_ratio"] = "compressed", None
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def export_params(model_cfg: ModelConfig, comp_cfg: CompressionConfig, params: dict[str, Any],
                  tokenizer: Any | None, out_dir: str | pathlib.Path, *, dtype: str | None = None,
                  shard_size: str | int = "2GB") -> pathlib.Path:
    """Export an in-memory params tree (``state.params`` or its ``"model"`` part; scanned or
    not; numpy or jax, sharded over any mesh) to ``out_dir``. ``model_cfg`` may be the base or
    the gist model config; ``tokenizer`` is the ``HFTokenizer`` to write with ``<gist>`` added
    (``data.tokenizer.hf_tokenizer_copy(run.data.tokenizer)``; None: no tokenizer files). Every
    process must call it (leaves are gathered collectively); only the primary writes. ``dtype``
    (e.g. "bfloat16") casts the stored tensors; default: as the params."""
    if "model" in params and "embed" not in params:
        params = params["model"]  # the TrainState tree; the AE decoder is not exported
    cfg = model_config_for(model_cfg, comp_cfg).replace(scan_layers="layers" in params)
    return export_source(cfg, comp_cfg, TreeSource(params), tokenizer, out_dir, dtype, shard_size)
