"""Tokenizers for training/eval: a tiny interface, four implementations, and `tokenizer_from_spec`.

Only `tokenizers`, numpy and the stdlib are imported here (no torch/transformers/tensorflow), so
data pipelines and JAX jobs can use this module cheaply; `gguf` and `sentencepiece` are imported
lazily.

`encode` never adds special tokens unless asked (`add_bos=True`): the gist/data code decides where
BOS/EOS go, not the tokenizer.
"""

from __future__ import annotations

import abc
import functools
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# llama.cpp's `tokenizer.ggml.pre` -> split regex, mirroring transformers' GGUF tokenizer builder
# (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`). Any other value (e.g. "smollm",
# "gpt2", "default") gets transformers' GPT-2 byte-level regex, so ids match transformers exactly.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


class Tokenizer(abc.ABC):
    """What the rest of gist_jax needs from a tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens only when asked."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens kept verbatim where they have a spelling)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int | None: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` (no specials); subclasses with a faster batch path override it."""
        return [self.encode(text) for text in texts]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        return ids


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then pad/bos/eos: no files, for tiny tests."""

    pad_id, bos_id, eos_id = 256, 257, 258  # plain class attributes satisfy the abstract properties
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(list(text.encode("utf-8")), add_bos, add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special-token facts HF keeps in side files.

    `pad_id` falls back to `eos_id` when no pad token is known (the usual HF practice).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.add_bos, self.add_eos = add_bos, add_eos  # the model's default, for HF export only
        self.chat_template = chat_template
        for token in (bos_token, eos_token, pad_token, unk_token):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary")

    # -- Tokenizer interface -------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Same ids as `encode` per text, tokenised on all cores (the `tokenizers` Rust thread pool).

        `encode_batch_fast` (tokenizers >= 0.21) skips character offsets: same ids, ~30% less CPU.
        """
        batch_encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in batch_encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pad = self._id(self.pad_token)
        return self.eos_id if pad is None else pad

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> HFTokenizer:
        """From an HF model directory: `tokenizer.json` plus whichever side files exist.

        Token strings come from `tokenizer_config.json`, then `special_tokens_map.json`; ids in
        `config.json` fill in whatever is still missing.
        """
        path = pathlib.Path(path)
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_config, special_map, model_config = (
            _read_json(path / name) for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json")
        )
        specials: dict[str, str | None] = {}
        for name in ("bos", "eos", "pad", "unk"):
            value = _token_content(tok_config.get(f"{name}_token")) or _token_content(special_map.get(f"{name}_token"))
            token_id = model_config.get(f"{name}_token_id")
            if isinstance(token_id, list):  # e.g. several EOS ids: the first is the canonical one
                token_id = token_id[0] if token_id else None
            if value is None and isinstance(token_id, int):
                value = tok.id_to_token(token_id)
            specials[f"{name}_token"] = value
        return cls(
            tok,
            **specials,
            add_bos=bool(tok_config.get("add_bos_token", False)),
            add_eos=bool(tok_config.get("add_eos_token", False)),
            chat_template=tok_config.get("chat_template"),
        )

    @classmethod
    def from_gguf(cls, path: str | pathlib.Path) -> HFTokenizer:
        """From the tokenizer a GGUF file describes in its metadata (no tensors are read)."""
        from gist_jax.hf.gguf import read_gguf_metadata, tokenizer_metadata

        return cls.from_gguf_metadata(tokenizer_metadata(read_gguf_metadata(path)))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> HFTokenizer:
        """From `GGUFContents.tokenizer_metadata` (the `tokenizer.ggml.*` keys without prefix)."""
        if meta.get("model") != "gpt2":
            raise ValueError(
                f"Unsupported GGUF tokenizer model {meta.get('model')!r}: only 'gpt2' (byte-level BPE) is supported"
            )
        tokens: list[str] = meta["tokens"]

        def token(key: str) -> str | None:
            index = meta.get(key)
            return None if index is None else tokens[index]

        tok = _byte_level_bpe(tokens, meta.get("merges") or [], meta.get("token_type") or [], meta.get("pre"))
        add_bos, add_eos = bool(meta.get("add_bos_token", False)), bool(meta.get("add_eos_token", False))
        bos, eos = token("bos_token_id"), token("eos_token_id")
        tok.post_processor = _template(bos if add_bos else None, eos if add_eos else None, tok)
        return cls(
            tok,
            bos_token=bos,
            eos_token=eos,
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=meta.get("chat_template"),
        )

    # -- export --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | pathlib.Path) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json`, loadable by `AutoTokenizer`.

        `tokenizer_class` is the generic fast class so transformers loads `tokenizer.json` as is
        instead of rebuilding a model-specific tokenizer (which could change the pre-tokenizer).
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (Llama 2, T5...). Ids of -1 (sentencepiece's "none") become None.

    Pickles as the serialized model, so it can travel to data-loading worker processes.
    """

    def __init__(self, processor: Any, path: str | None = None) -> None:
        self.processor = processor  # sentencepiece.SentencePieceProcessor
        self.path = path

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> SentencePieceTokenizer:
        import sentencepiece

        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} not found")
        return cls(sentencepiece.SentencePieceProcessor(model_file=str(path)), str(path))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(list(self.processor.encode(text, out_type=int)), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.processor.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    @staticmethod
    def _optional(token_id: int) -> int | None:
        return None if token_id < 0 else int(token_id)

    @property
    def bos_id(self) -> int | None:
        return self._optional(self.processor.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._optional(self.processor.eos_id())

    @property
    def pad_id(self) -> int | None:
        return self._optional(self.processor.pad_id())

    @property
    def unk_id(self) -> int | None:
        return self._optional(self.processor.unk_id())

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.processor.serialized_model_proto(), "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_proto=state["model"])
        self.path = state["path"]


TOKENIZER_SPEC_FORMS = ("bytes", "gguf:smollm2", "gguf:<file.gguf>", "hf:<dir>", "sentencepiece:<file.model>",
                        "checkpoint:<dir>")


def split_tokenizer_spec(spec: str) -> tuple[str, str]:
    """``"hf:/models/x"`` -> ``("hf", "/models/x")``, ``"bytes"`` -> ``("bytes", "")``; any other form
    is a ``ValueError`` listing `TOKENIZER_SPEC_FORMS`. The one parser of the forms, shared by
    `tokenizer_from_spec` and the run's start-up checks (``gist_jax.train.preflight``)."""
    kind, sep, arg = spec.partition(":")
    if spec == "bytes":
        return "bytes", ""
    if sep and arg and kind in ("gguf", "hf", "sentencepiece", "checkpoint"):
        return kind, arg
    raise ValueError(f"unknown tokenizer spec {spec!r}; expected one of: {', '.join(TOKENIZER_SPEC_FORMS)}")


@functools.cache
def tokenizer_from_spec(spec: str) -> Tokenizer:
    """The tokenizer a compact spec names (one of `TOKENIZER_SPEC_FORMS`), built once per spec.

    Cached because parsing a GGUF vocabulary takes seconds and every data source asks for it.
    """
    kind, arg = split_tokenizer_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gguf":
        from gist_jax.hf.gguf import smollm2_gguf_path

        path = smollm2_gguf_path() if arg == "smollm2" else _existing(arg, spec, is_dir=False)
        return HFTokenizer.from_gguf(path)
    if kind == "hf":
        return HFTokenizer.from_dir(_existing(arg, spec, is_dir=True))
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_file(_existing(arg, spec, is_dir=False))
    return load_tokenizer(_existing(arg, spec, is_dir=True))


def load_tokenizer(directory: str | pathlib.Path) -> HFTokenizer:
    """The tokenizer a converted params directory holds (``<dir>/tokenizer``, written by
    ``gist_jax.convert`` next to the params). Here, not in ``model/params_io.py``: the params
    format knows only the folder's name, so the model layer never imports the tokenizers."""
    from gist_jax.model.params_io import TOKENIZER_DIR

    return HFTokenizer.from_dir(pathlib.Path(directory) / TOKENIZER_DIR)


def _existing(path: str, spec: str, is_dir: bool) -> pathlib.Path:
    resolved = pathlib.Path(path).expanduser()
    if not (resolved.is_dir() if is_dir else resolved.is_file()):
        raise FileNotFoundError(f"tokenizer spec {spec!r}: no {'directory' if is_dir else 'file'} {path!r}")
    return resolved


def gguf_tokenizer(path: str | pathlib.Path) -> HFTokenizer:
    """Shorthand for `HFTokenizer.from_gguf`."""
    return HFTokenizer.from_gguf(path)


def hf_tokenizer_copy(spec: str) -> HFTokenizer | None:
    """The tokenizer of ``spec`` as a fresh ``HFTokenizer`` with the same ids, for writing
    ``tokenizer.json`` (an export adds ``<gist>`` to it, which ``tokenizer_from_spec``'s cache must
    never see); a byte tokenizer becomes an equivalent byte-level BPE; None if it has no such form."""
    tok = tokenizer_from_spec(spec)
    if isinstance(tok, HFTokenizer):
        return HFTokenizer(tokenizers.Tokenizer.from_str(tok.tokenizer.to_str()), bos_token=tok.bos_token,
                           eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
                           add_bos=tok.add_bos, add_eos=tok.add_eos, chat_template=tok.chat_template)
    if isinstance(tok, ByteTokenizer):
        return _byte_tokenizer()
    logging.getLogger(__name__).warning("data.tokenizer=%r has no tokenizer.json form; the export has no "
                                        "tokenizer files (copy the tokenizer next to it by hand)", spec)
    return None


def _byte_tokenizer() -> HFTokenizer:
    """``ByteTokenizer`` as an HF tokenizer with the same ids (bytes 0..255, pad/bos/eos)."""
    spelling = bytes_to_unicode()
    tok = tokenizers.Tokenizer(models.BPE(vocab={spelling[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = {ByteTokenizer.pad_id: "<pad>", ByteTokenizer.bos_id: "<s>", ByteTokenizer.eos_id: "</s>"}
    tok.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in sorted(names)])
    return HFTokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int],
                    pre: str | None) -> tokenizers.Tokenizer:
    """Byte-level BPE as transformers builds it from GGUF metadata (GPT2Tokenizer + added tokens).

    Tokens spelled outside the byte alphabet are respelled byte by byte; CONTROL tokens become
    special added tokens and USER_DEFINED ones plain added tokens, so both are matched whole.
    """
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tok = tokenizers.Tokenizer(bpe)
    split = GGUF_PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def _template(bos: str | None, eos: str | None, tok: tokenizers.Tokenizer) -> processors.TemplateProcessing:
    """Post-processor for the saved HF dir: adds BOS/EOS when the model's metadata says so."""
    pre, post = ([bos] if bos else []), ([eos] if eos else [])
    return processors.TemplateProcessing(
        single=[*pre, "$A", *post],
        pair=[*pre, "$A", *post, *pre, "$B:1", *post],
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(pre + post)],
    )


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """HF stores a special token as a string or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
