"""Gist-token compressed inference for transformers (written by gist_jax into every export).

Self-contained: imports only torch and transformers. Load with

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    out = model(input_ids, attention_mask=mask).logits  # compressed logits of every raw token
    ids = model.generate(input_ids, max_new_tokens=32)   # transformers' generate, compressed

``Gist<Base>`` (e.g. ``GistLlamaForCausalLM``, the name an export's ``auto_map`` gives) is built
on first use over transformers' ``<Base>`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``: any Llama-shaped decoder) and adds the gist parameters
(``gist.embedding`` and, with Beacon-style projections, ``gist.layers.{i}.{q,k,v}_proj``).
``forward`` is compressed unless ``config.gist_forward == "full"`` (or ``compressed=False``), at
``config.gist_ratio`` (None: ``gist.inference_ratio``), so what transformers' ``generate``,
pipelines and lm-evaluation-harness call is the compressed model; padded rows run alone over
their real tokens (``GistCache``). The compressed path follows gist_jax's sequential path
(``gist_jax/gist/sequential.py``) segment by segment:

  * KV variants (Fine-KV, Coarse-KV): each segment (raw tokens with gist tokens inserted: fine,
    one after every r raw tokens; coarse, all after the segment) attends causally to itself and
    to a per-layer memory holding the keys (rotated at their memory positions) and values of the
    sink tokens and of the gists of earlier segments; raw KV of finished segments is dropped.
  * Coarse-Rec: each segment runs as ``[sinks ; memory ; raw ; gists]`` with plain causal
    attention, where memory is the post-norm last-layer states of all earlier gists fed back as
    input embeddings.
  * Positions: ``compressed`` (memory at 0..m-1, the segment after it) or ``aligned`` (raw
    tokens keep their index, a gist takes the index of the raw token after it).
  * UniGist (``gist.window`` W > 0; Fine-KV, aligned positions): no segments. A gist follows
    every r raw tokens and every token sees, causally, the sinks, every earlier gist and the raw
    tokens from (its gist unit's first raw index) - W. The cache holds the sinks and gists
    (keys rotated at their one position) and the last W + r raw tokens; older raw KV is
    dropped as the window slides (``gist_jax.inference.window``).
An unfinished last segment runs with the gists of its complete groups (fine) or none (coarse);
when it fills up it is compressed like any other. Gist logits are never returned or sampled,
and ``generate`` never picks the ``<gist>`` id or an id beyond the tokenizer
(``config.gist.tokenizer_vocab_size``), as ``gist_jax.inference`` does; it refuses beam search.
The settings come from ``config.gist`` (written by the exporter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x_BxHxTxD: torch.Tensor, cos_BxTxD: torch.Tensor, sin_BxTxD: torch.Tensor) -> torch.Tensor:
    return x_BxHxTxD * cos_BxTxD[:, None] + _rotate_half(x_BxHxTxD) * sin_BxTxD[:, None]


class GistProjections(nn.Module):
    """Separate q/k/v projections applied only at gist positions (Activation Beacon)."""

    def __init__(self, config, bias: bool):
        super().__init__()
        e, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(e, config.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(e, config.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(e, config.num_key_value_heads * d, bias=bias)


class GistParameters(nn.Module):
    def __init__(self, config, bias: bool):
        super().__init__()
        g = config.gist
        self.embedding = nn.Parameter(torch.zeros(g["num_gist_embeddings"], config.hidden_size))
        self.layers = (nn.ModuleList([GistProjections(config, bias) for _ in range(config.num_hidden_layers)])
                       if g["gist_projections"] else None)


class _Segment:
    """One segment's token order, positions and gist bookkeeping (host-side lists)."""

    def __init__(self, g: dict, index: int, num_raw: int, ratio: int, gists_before: int):
        L, s = g["segment_length"], g["num_sinks"]
        full = num_raw == L
        fine = g["granularity"] == "fine"
        self.order: list[int] = []  # raw offset >= 0, gist slot j as -(j + 1)
        if fine:
            for j in range(num_raw // ratio):
                self.order += list(range(j * ratio, (j + 1) * ratio)) + [-(j + 1)]
            self.order += list(range(num_raw // ratio * ratio, num_raw))
        else:
            self.order = list(range(num_raw)) + ([-(j + 1) for j in range(L // ratio)] if full else [])
        self.full = full
        offset = 0 if index == 0 else s + gists_before
        compressed = g["positions"] == "compressed"
        self.position, self.memory_position = [], {}
        for k, item in enumerate(self.order):
            raw = index * L + item
            if item >= 0:
                self.position.append(offset + k if compressed else raw)
            else:
                slot = -item - 1
                aligned = (index + 1) * L if not fine else index * L + slot * ratio + ratio
                self.position.append(offset + k if compressed else aligned)
                self.memory_position[k] = s + gists_before + slot if compressed else aligned
        self.is_gist = [item < 0 for item in self.order]
        self.rows = [(-item - 1) if (item < 0 and g["gist_embedding"] == "per_slot") else 0 for item in self.order]
        self.raw_at = [k for k, item in enumerate(self.order) if item >= 0]
        # Tokens kept in memory once the segment is finished: sinks, then its gists in order.
        self.sinks = [k for k, item in enumerate(self.order) if index == 0 and 0 <= item < s]
        self.gists = [k for k, item in enumerate(self.order) if item < 0] if full else []


class GistState:
    """What compressed inference carries between calls: the memory and the unfinished segment."""

    def __init__(self):
        self.segments = 0  # finished segments
        self.gists = 0  # gists in memory
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [B, K, M, D]
        self.states: torch.Tensor | None = None  # recurrent: [B, M, E]
        self.state_positions: list[int] = []
        self.sink_ids: torch.Tensor | None = None  # [B, s]
        self.tail: torch.Tensor | None = None  # raw ids of the unfinished segment [B, t]
        self.tail_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # KV memories: its items' un-rotated k, v
        self.tail_items = 0  # items (raw and gist) of the unfinished segment in tail_kv
        self.raw_count = 0  # UniGist: raw tokens fed
        self.window_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [B, K, <=W+r, D]
        self.window_raw: list[int] = []  # UniGist: raw index of each window entry


class _Chunk:
    """What ``_embed`` needs of a UniGist chunk: which tokens are gists and their embedding rows."""

    def __init__(self, is_gist: list[bool], rows: list[int]):
        self.is_gist, self.rows = is_gist, rows


class GistCompressionMixin:
    """Compressed forward and greedy generation on top of a Llama-shaped causal LM."""

    if TYPE_CHECKING:  # provided by the transformers class this is mixed into
        config: Any
        model: Any
        lm_head: nn.Linear

    def _gist_setup(self, config: Any) -> None:
        if getattr(config, "gist", None) is None:
            raise ValueError("config.json has no 'gist' section: this is not a gist_jax export with compression")
        # The gist projections carry biases exactly when the base ones do (Qwen2's).
        self.gist = GistParameters(config, bias=self.model.layers[0].self_attn.q_proj.bias is not None)

    def gist_settings(self, ratio: int | None = None) -> tuple[dict, int]:
        g = dict(self.config.gist)
        ratio = int(ratio or getattr(self.config, "gist_ratio", None) or g["inference_ratio"])
        L = g["segment_length"]
        if L % ratio:
            raise ValueError(f"compression ratio {ratio} must divide gist.segment_length={L}")
        if g["gist_embedding"] == "per_slot" and L // ratio > g["num_gist_embeddings"]:
            raise ValueError(f"ratio {ratio} needs {L // ratio} gist embeddings, the export has "
                             f"{g['num_gist_embeddings']}; use a ratio >= {L // g['num_gist_embeddings']}")
        if g["memory"] not in ("kv", "recurrent"):
            raise ValueError(f"gist.memory={g['memory']!r}: use the plain forward for memory='none'")
        if g.get("window", 0) % ratio:
            raise ValueError(f"compression ratio {ratio} must divide gist.window={g['window']}")
        return g, ratio

    # ------------------------------------------------------------------ one pass
    def _embed(self, ids_BxT: torch.Tensor, seg: _Segment | _Chunk | None, prefix: int) -> torch.Tensor:
        x = self.model.embed_tokens(ids_BxT)
        if seg is not None:
            is_gist = torch.tensor([False] * prefix + seg.is_gist, device=x.device)
            rows = torch.tensor([0] * prefix + seg.rows, device=x.device)
            gist = self.gist.embedding[rows].to(x.dtype)
            x = torch.where(is_gist[None, :, None], gist[None], x)
        return x

    def _qkv(self, layer_index: int, attn: Any, h: torch.Tensor,
             is_gist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        if self.gist.layers is not None:
            gp: Any = self.gist.layers[layer_index]
            m = is_gist[None, :, None]
            q, k, v = (torch.where(m, gp_proj(h), base)
                       for gp_proj, base in ((gp.q_proj, q), (gp.k_proj, k), (gp.v_proj, v)))
        return q, k, v

    def _pass(self, x: torch.Tensor, positions: list[int], is_gist: list[bool],
              memory: list[tuple[torch.Tensor, torch.Tensor]] | None, mask_TxS: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Decoder layers over ``x`` [B, T, E] (causal) after an optional per-layer KV memory;
        ``mask_TxS`` [T, M + T] replaces the default (all memory, causal) where queries differ in
        what they see (UniGist). Returns (logits, post-norm hidden, per-layer un-rotated (k, v))."""
        b, t, _ = x.shape
        cfg = self.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        pos = torch.tensor(positions, device=x.device)[None].expand(b, t)
        cos, sin = self.model.rotary_emb(x, pos)
        gist_mask = torch.tensor(is_gist, device=x.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        kv_out = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(i, attn, h, gist_mask)
            q = q.view(b, t, n, d).transpose(1, 2)
            k = k.view(b, t, kv_heads, d).transpose(1, 2)
            v = v.view(b, t, kv_heads, d).transpose(1, 2)
            kv_out.append((k, v))
            keys, values, mask = _rope(k, cos, sin), v, causal
            if memory is not None and memory[i][0].shape[2]:
                mk, mv = memory[i]
                keys, values = torch.cat([mk, keys], dim=2), torch.cat([mv, values], dim=2)
                mask = torch.cat([torch.ones(t, mk.shape[2], dtype=torch.bool, device=x.device), causal], dim=1)
            if mask_TxS is not None:
                mask = mask_TxS
            q = _rope(q, cos, sin)
            groups = n // kv_heads
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q.float(), keys.float().transpose(2, 3)) * (d ** -0.5)
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            out = torch.matmul(probs, values).transpose(1, 2).reshape(b, t, n * d)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.model.norm(x)
        return self.lm_head(hidden).float(), hidden, kv_out

    # ------------------------------------------------------------------ one segment
    def _segment(self, g: dict, state: GistState, raw_ids: torch.Tensor, ratio: int, commit: bool) -> torch.Tensor:
        """Run one (possibly unfinished) segment against the memory; returns raw-token logits.
        With ``commit`` (a finished segment) its sinks and gists enter the memory."""
        b, num_raw = raw_ids.shape
        seg = _Segment(g, state.segments, num_raw, ratio, state.gists)
        if g["memory"] == "kv":
            logits = self._kv_segment(state, seg, raw_ids, commit)
        else:
            order = torch.tensor([max(item, 0) for item in seg.order], device=raw_ids.device)
            ids = raw_ids[:, order]
            prefix_ids, prefix_pos = [], []
            if state.segments > 0 and state.sink_ids is not None and state.sink_ids.shape[1]:
                prefix_ids.append(state.sink_ids)  # sinks again, at their raw index, before the memory
                prefix_pos += list(range(state.sink_ids.shape[1]))
            n_mem = 0 if state.states is None else state.states.shape[1]
            s = sum(p.shape[1] for p in prefix_ids)
            zeros = torch.zeros(b, n_mem, dtype=ids.dtype, device=ids.device)
            all_ids = torch.cat(prefix_ids + [zeros, ids], dim=1)
            prefix = s + n_mem
            x = self._embed(all_ids, seg, prefix)
            if state.states is not None and n_mem:
                x = torch.cat([x[:, :s], state.states.to(x.dtype), x[:, prefix:]], dim=1)
            positions = prefix_pos + state.state_positions + seg.position
            logits, hidden, _ = self._pass(x, positions, [False] * prefix + seg.is_gist, None)
            logits = logits[:, prefix:]
            if commit:
                if state.segments == 0:
                    state.sink_ids = raw_ids[:, :g["num_sinks"]]
                gist_idx = torch.tensor([prefix + k for k in seg.gists], dtype=torch.long, device=ids.device)
                new_states = hidden[:, gist_idx]
                state.states = new_states if state.states is None else torch.cat([state.states, new_states], dim=1)
                state.state_positions = state.state_positions + [seg.memory_position[k] for k in seg.gists]
            logits = logits[:, seg.raw_at]
        if commit:
            state.segments += 1
            state.gists += len(seg.gists)
        return logits

    def _kv_segment(self, state: GistState, seg: _Segment, raw_ids: torch.Tensor, commit: bool) -> torch.Tensor:
        """The KV memories' segment, incrementally: only the items (raw tokens, gists) not run
        by an earlier call for this segment run now, against the memory and the cached keys
        and values of the segment's earlier items (a longer tail's order extends a shorter
        one's, positions included), so decoding one token costs one token's pass, not the
        segment's. Returns the logits of the new raw tokens; with ``commit`` the segment's
        sinks and gists enter the memory (keys rotated at their memory positions)."""
        b, done, dev = raw_ids.shape[0], state.tail_items, raw_ids.device
        order = torch.tensor([max(item, 0) for item in seg.order[done:]], dtype=torch.long, device=dev)
        x = self._embed(raw_ids[:, order], _Chunk(seg.is_gist[done:], seg.rows[done:]), 0)
        memory = state.kv
        if done:
            cos, sin = self.model.rotary_emb(x, torch.tensor(seg.position[:done], device=dev)[None].expand(b, done))
            cached = [(_rope(k, cos, sin), v) for k, v in state.tail_kv or []]
            memory = cached if memory is None else [(torch.cat([mk, k], 2), torch.cat([mv, v], 2))
                                                    for (mk, mv), (k, v) in zip(memory, cached)]
        logits, _, kv = self._pass(x, seg.position[done:], seg.is_gist[done:], memory)
        if done:
            kv = [(torch.cat([ck, k], 2), torch.cat([cv, v], 2)) for (ck, cv), (k, v) in zip(state.tail_kv or [], kv)]
        if commit:
            keep = seg.sinks + seg.gists  # sinks sit at their raw index in both schemes
            mem_pos = [seg.order[k] for k in seg.sinks] + [seg.memory_position[k] for k in seg.gists]
            cos, sin = self.model.rotary_emb(x, torch.tensor(mem_pos, device=dev)[None].expand(b, len(keep)))
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            new = [(_rope(k[:, :, idx], cos, sin), v[:, :, idx]) for k, v in kv]
            state.kv = new if state.kv is None else [
                (torch.cat([mk, nk], 2), torch.cat([mv, nv], 2)) for (mk, mv), (nk, nv) in zip(state.kv, new)]
            state.tail_kv, state.tail_items = None, 0
        else:
            state.tail_kv, state.tail_items = kv, len(seg.order)
        return logits[:, [k - done for k in seg.raw_at if k >= done]]

    # ------------------------------------------------------------------ UniGist
    def _window_chunk(self, g: dict, state: GistState, raw_ids: torch.Tensor, ratio: int) -> torch.Tensor:
        """Feed raw tokens [B, n] (a gist inserted after every r-th raw token of the stream)
        against the cache; returns their logits and leaves sinks, gists and the last W + r raw
        tokens in ``state``."""
        b, n = raw_ids.shape
        r, s, W = ratio, g["num_sinks"], g["window"]
        t, dev, n0 = g["segment_length"] // r, raw_ids.device, state.raw_count
        take, raw_at, pos, start, gist, rows = [], [], [], [], [], []
        for j in range(n):
            raw = n0 + j
            u = raw // r
            items = [(raw, raw, False)] + ([(-1, (u + 1) * r, True)] if (raw + 1) % r == 0 else [])
            for raw_index, position, is_gist in items:
                take.append(j)
                raw_at.append(raw_index)
                pos.append(position)
                start.append(max(0, u * r - W))
                gist.append(is_gist)
                rows.append(u % t if is_gist and g["gist_embedding"] == "per_slot" else 0)
        T = len(take)
        raw_T, start_T = torch.tensor(raw_at, device=dev), torch.tensor(start, device=dev)
        always_T = torch.tensor(gist, device=dev) | ((raw_T >= 0) & (raw_T < s))
        own = torch.ones(T, T, dtype=torch.bool, device=dev).tril() & (
            always_T[None, :] | (raw_T[None, :] >= start_T[:, None]))
        if state.kv is None:
            cfg = self.config
            d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            empty = torch.zeros(b, cfg.num_key_value_heads, 0, d, dtype=self.lm_head.weight.dtype, device=dev)
            state.kv = [(empty, empty)] * cfg.num_hidden_layers
            state.window_kv = [(empty, empty)] * cfg.num_hidden_layers
        assert state.window_kv is not None
        n_mem = state.kv[0][0].shape[2]
        win = torch.tensor(state.window_raw, dtype=torch.long, device=dev)[None, :] >= start_T[:, None]
        mask = torch.cat([torch.ones(T, n_mem, dtype=torch.bool, device=dev), win, own], dim=1)
        memory = [(torch.cat([mk, wk], 2), torch.cat([mv, wv], 2))
                  for (mk, mv), (wk, wv) in zip(state.kv, state.window_kv)]
        x = self._embed(raw_ids[:, torch.tensor(take, device=dev)], _Chunk(gist, rows), 0)
        logits, _, kv = self._pass(x, pos, gist, memory, mask)
        cos, sin = self.model.rotary_emb(x, torch.tensor(pos, device=dev)[None].expand(b, T))
        rotated = [(_rope(k, cos, sin), v) for k, v in kv]
        to_mem = torch.tensor([i for i in range(T) if gist[i] or 0 <= raw_at[i] < s], dtype=torch.long, device=dev)
        state.kv = [(torch.cat([mk, k[:, :, to_mem]], 2), torch.cat([mv, v[:, :, to_mem]], 2))
                    for (mk, mv), (k, v) in zip(state.kv, rotated)]
        state.raw_count = n0 + n
        # The next token reaches back at most to raw index raw_count - r - W: keep W + r.
        to_win = [i for i in range(T) if raw_at[i] >= s]
        window_raw = state.window_raw + [raw_at[i] for i in to_win]
        keep = torch.tensor([i for i, raw in enumerate(window_raw) if raw >= state.raw_count - (W + r)],
                            dtype=torch.long, device=dev)
        new_win = torch.tensor(to_win, dtype=torch.long, device=dev)
        state.window_kv = [(torch.cat([wk, k[:, :, new_win]], 2)[:, :, keep],
                            torch.cat([wv, v[:, :, new_win]], 2)[:, :, keep])
                           for (wk, wv), (k, v) in zip(state.window_kv, rotated)]
        state.window_raw = [window_raw[i] for i in keep.tolist()]
        return logits[:, [i for i in range(T) if not gist[i]]]

    def consume(self, input_ids: torch.Tensor, state: GistState | None = None,
                ratio: int | None = None) -> tuple[torch.Tensor, GistState]:
        """Append ``input_ids`` [B, n] to the sequence in ``state``; returns the logits of these
        n tokens [B, n, V] and the updated state (finished segments compressed into memory)."""
        g, ratio = self.gist_settings(ratio)
        if g.get("gist_token_id") is not None and bool((input_ids == g["gist_token_id"]).any()):
            raise ValueError(f"input_ids contain the <gist> marker (id {g['gist_token_id']}); the model inserts "
                             "gist tokens itself: remove it from the text (or tokenize with split_special_tokens=True)")
        state = GistState() if state is None else state
        if g.get("window", 0):
            return self._window_chunk(g, state, input_ids, ratio), state
        L = g["segment_length"]
        seq = input_ids if state.tail is None else torch.cat([state.tail, input_ids], dim=1)
        outputs = []
        while seq.shape[1] >= L:
            outputs.append(self._segment(g, state, seq[:, :L], ratio, commit=True))
            seq = seq[:, L:]
        if seq.shape[1]:
            outputs.append(self._segment(g, state, seq, ratio, commit=False))
        state.tail = seq
        logits = torch.cat(outputs, dim=1)
        return logits[:, logits.shape[1] - input_ids.shape[1]:], state

    @torch.no_grad()
    def compressed_forward(self, input_ids: torch.Tensor, ratio: int | None = None) -> torch.Tensor:
        """Float32 logits [B, n, V] of every raw token under gist compression."""
        return self.consume(input_ids, None, ratio)[0]

    def _sampleable(self, logits_BxV: torch.Tensor) -> torch.Tensor:
        """``logits`` with -inf on ids generation must never pick: the ``<gist>`` marker (the
        model inserts gists itself, and ``consume`` refuses it as input) and LM-head rows at or
        beyond the tokenizer's size (a vocabulary padded past the tokenizer, as Qwen2's is, has
        rows no text decodes to). Same ids as ``gist_jax.inference.sampleable_ids``."""
        g = self.config.gist
        ids_V = torch.arange(logits_BxV.shape[-1], device=logits_BxV.device)
        banned_V = torch.zeros_like(ids_V, dtype=torch.bool)
        if g.get("tokenizer_vocab_size") is not None:
            banned_V |= ids_V >= g["tokenizer_vocab_size"]
        if g.get("gist_token_id") is not None:
            banned_V |= ids_V == g["gist_token_id"]
        return logits_BxV.masked_fill(banned_V, float("-inf"))

    # ------------------------------------------------------------------ transformers' entry points
    def _compressing(self, compressed: bool | None) -> bool:
        if compressed is not None:
            return bool(compressed)
        mode = getattr(self.config, "gist_forward", None) or "compressed"
        if mode not in ("compressed", "full"):
            raise ValueError(f"config.gist_forward={mode!r}: use 'compressed' (gist memory) or 'full' (the stock "
                             "uncompressed model)")
        return mode == "compressed"

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, *,
                compressed: bool | None = None, ratio: int | None = None, **kwargs: Any) -> Any:
        """Compressed by default (``config.gist_forward``; ``compressed=False`` or
        ``gist_forward="full"`` is the stock model). Takes what transformers' ``generate``, its
        pipelines and lm-evaluation-harness pass: a 2-D ``attention_mask`` (left or right
        padding; a row's masked tokens are not part of its sequence, so padding never reaches a
        gist), ``past_key_values`` (a ``GistCache``: the compressed memory, returned unless
        ``use_cache=False``), ``labels`` (the shifted mean cross-entropy over labels != -100)
        and ``logits_to_keep``. ``position_ids`` are implied by the mask; given, they must match."""
        if not self._compressing(compressed):
            if isinstance(past_key_values, GistCache):
                raise ValueError("past_key_values is a compressed GistCache; the uncompressed forward needs its own")
            return super().forward(  # type: ignore[misc]  # the transformers class's forward
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs)
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("the compressed forward takes input_ids (it inserts the gist tokens itself), not "
                             "inputs_embeds; pass compressed=False for the uncompressed model")
        if past_key_values is not None and not isinstance(past_key_values, GistCache):
            if past_key_values.get_seq_length() > 0:
                raise ValueError(f"past_key_values is a {type(past_key_values).__name__} holding tokens; the "
                                 "compressed forward continues only its own GistCache")
            past_key_values = None
        cache = GistCache() if past_key_values is None else past_key_values
        _, ratio = self.gist_settings(ratio if ratio is not None else cache.ratio)
        if cache.ratio is not None and cache.ratio != ratio:
            raise ValueError(f"this GistCache was filled at ratio {cache.ratio}, not {ratio}")
        cache.ratio = ratio
        n = input_ids.shape[1]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the compressed forward takes a 2-D attention_mask [batch, tokens] (1 = token, 0 = pad)")
        keep_BxN = None if attention_mask is None else attention_mask[:, -n:].bool()
        if position_ids is not None:
            self._check_positions(cache, position_ids[:, -n:], keep_BxN)
        logits = cache.feed(self, input_ids, keep_BxN)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                               ignore_index=-100)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=None if use_cache is False else cache)

    @staticmethod
    def _check_positions(cache: GistCache, position_ids_BxN: torch.Tensor, keep_BxN: torch.Tensor | None) -> None:
        """The compressed model places every token itself (its index among the row's real
        tokens, gists between them): explicit positions must agree, or they would be ignored."""
        b, n = position_ids_BxN.shape
        keep = torch.ones(b, n, dtype=torch.bool) if keep_BxN is None else keep_BxN.cpu()
        seen = torch.tensor(cache.real_counts(b))
        implied_BxN = seen[:, None] + keep.long().cumsum(1) - 1
        if bool((position_ids_BxN.cpu() != implied_BxN)[keep].any()):
            raise ValueError("position_ids differ from each row's token index (the compressed model positions "
                             "tokens and gists itself); leave position_ids out")

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, compressed: bool | None = None,
                 ratio: int | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` (greedy or sampled, stopping criteria, ``max_length``,
        batches with padding, streamers, ``pipeline("text-generation")``) on the compressed
        forward, with a ``GistCache`` holding the memory between steps; it never picks the
        ``<gist>`` id nor one beyond the tokenizer (``_sampleable``). Beam search is refused: it
        reorders caches, which a compressed memory does not support. ``compressed=False`` (or
        ``gist_forward="full"``) is the stock uncompressed ``generate``."""
        if not self._compressing(compressed):
            return super().generate(inputs, *args, compressed=False, **kwargs)  # type: ignore[misc]
        self.gist_settings(ratio)  # a bad ratio fails before anything runs
        if int(kwargs.get("num_beams") or getattr(self.generation_config, "num_beams", 1) or 1) > 1:
            raise ValueError("compressed generate supports greedy and sampling, not beam search (num_beams > 1); "
                             "pass compressed=False for beams on the uncompressed model")
        if kwargs.get("use_cache", True) is not False and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = GistCache()
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(_Unsampleable(self))
        return super().generate(  # type: ignore[misc]  # the transformers class's generate
            inputs, *args, compressed=True, ratio=ratio, logits_processor=processors, **kwargs)


class _Unsampleable:
    """A logits processor (transformers calls it as ``(input_ids, scores)``) that bans the ids
    compressed generation must never pick (``GistCompressionMixin._sampleable``)."""

    def __init__(self, model: GistCompressionMixin):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, scores_BxV: torch.Tensor) -> torch.Tensor:
        return self.model._sampleable(scores_BxV)


class GistCache:
    """What the compressed model carries between forward calls (``past_key_values``): the
    compressed memory of the whole batch while no row has padding, one ``GistState`` per row
    once one has (each row then runs alone over its real tokens: rows of different lengths
    compress different segments, and a padding token must never enter a gist). ``seen`` counts
    the positions of ``input_ids`` fed so far, padding included, as transformers' ``generate``
    slices its inputs by it."""

    is_compileable = False  # what generate asks of a cache; this one is host-side Python
    is_croppable = False

    def __init__(self) -> None:
        self.state: GistState | None = None  # the batch's, while no row is padded
        self.rows: list[GistState | None] | None = None  # per row, after padding
        self.row_real: list[int] = []  # real tokens per row (for position checks)
        self.batch_real = 0
        self.seen = 0
        self.ratio: int | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def real_counts(self, batch: int) -> list[int]:
        return list(self.row_real) if self.rows is not None else [self.batch_real] * batch

    def feed(self, model: GistCompressionMixin, input_ids_BxN: torch.Tensor,
             keep_BxN: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, n, V] of the new tokens (zeros where masked out); updates the memory."""
        b, n = input_ids_BxN.shape
        self.seen += n
        if self.rows is None and (keep_BxN is None or bool(keep_BxN.all())):
            logits, self.state = model.consume(input_ids_BxN, self.state, self.ratio)
            self.batch_real += n
            return logits
        if self.rows is None:  # the first padded call: split the batch's memory into rows
            self.rows = [None if self.state is None else _row_state(self.state, i) for i in range(b)]
            self.row_real = [self.batch_real] * b
            self.state = None
        assert keep_BxN is not None
        out: torch.Tensor | None = None
        for i in range(b):
            keep_N = keep_BxN[i].to(input_ids_BxN.device)
            if not bool(keep_N.any()):
                continue
            logits, self.rows[i] = model.consume(input_ids_BxN[i:i + 1, keep_N], self.rows[i], self.ratio)
            if out is None:
                out = logits.new_zeros(b, n, logits.shape[-1])
            out[i, keep_N] = logits[0]
            self.row_real[i] += int(keep_N.sum())
        if out is None:
            raise ValueError("every token of this call is masked out (attention_mask is all 0)")
        return out


def _row_state(state: GistState, i: int) -> GistState:
    """Row ``i`` of a batch's ``GistState`` (tensors sliced to batch 1, bookkeeping copied)."""
    row = GistState()
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            value = value[i:i + 1]
        elif isinstance(value, list) and value and isinstance(value[0], tuple):
            value = [tuple(t[i:i + 1] for t in pair) for pair in value]
        elif isinstance(value, list):
            value = list(value)
        setattr(row, name, value)
    return row


_GIST_CLASSES: dict[str, type] = {}


def gist_class(base_name: str) -> type:
    """``Gist<base_name>``: ``GistCompressionMixin`` over transformers' ``base_name`` (built once).

    One definition for every family, so a new family needs nothing here: its export names
    ``Gist<its transformers class>`` and this module builds it."""
    if base_name not in _GIST_CLASSES:
        base = getattr(transformers, base_name)

        def __init__(self: Any, config: Any) -> None:
            base.__init__(self, config)
            self._gist_setup(config)
            self.post_init()

        _GIST_CLASSES[base_name] = type(f"Gist{base_name}", (GistCompressionMixin, base),
                                        {"__init__": __init__, "__module__": __name__})
    return _GIST_CLASSES[base_name]


def __getattr__(name: str) -> type:
    """``modeling_gist.Gist<Base>`` (what transformers' ``auto_map`` loader asks for)."""
    if name.startswith("Gist") and name.endswith("ForCausalLM") and hasattr(transformers, name[len("Gist"):]):
        return gist_class(name[len("Gist"):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
