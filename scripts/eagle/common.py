"""Pieces shared by the EAGLE scripts: the target model read from its GGUF file, and the
EAGLE-1 draft head.

The target is a plain f32 Llama forward over the GGUF weights, dequantized at load (the same
numbers Specula's CPU backend computes with). Query and key rows are put back in the Hugging
Face order, so RoPE is the rotate-half kind, as in Specula and in the head's saved weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    eos_token_id: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ----------------------------------------------------------------------------------------
# Target model from GGUF


GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's converter, which interleaves the two rotary halves of each head."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_gguf(path: str) -> tuple[LlamaShape, dict[str, np.ndarray]]:
    """The model's shape and its weights as f32 arrays, under Hugging Face-like names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)

    def meta(key):
        return reader.fields[key].contents()

    heads = int(meta("llama.attention.head_count"))
    kv_heads = int(meta("llama.attention.head_count_kv"))
    hidden = int(meta("llama.embedding_length"))
    shape = LlamaShape(
        hidden_size=hidden,
        num_hidden_layers=int(meta("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=int(meta("llama.feed_forward_length")),
        rope_theta=float(meta("llama.rope.freq_base")),
        rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
        vocab_size=int(meta("llama.vocab_size")),
        eos_token_id=int(meta("tokenizer.ggml.eos_token_id")),
    )
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}"
            if parts[2] == "attn_q":
                w = unpermute_rows(w, heads)
            elif parts[2] == "attn_k":
                w = unpermute_rows(w, kv_heads)
        else:
            name = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}[parts[0]]
        weights[name] = w
    return shape, weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotate-half RoPE at integer positions `pos` [B, T] -> [B, 1, T, head_dim]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    angles = (pos[..., None].double() * inv_freq).float()
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KvCache:
    """Keys and values of every layer for a batch of rows, with a validity mask per slot."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, device):
        self.k = torch.zeros(layers, batch, kv_heads, capacity, head_dim, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # slots in use, the same for every row


def attention_mask(valid: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """[B, 1, count, start+count]: a query sees valid earlier slots and always itself (so a
    padding query never sees nothing, which would put NaN into the cache)."""
    total = start + count
    keys = torch.arange(total, device=valid.device)
    queries = torch.arange(start, total, device=valid.device)[:, None]
    causal = keys[None, :] <= queries
    own = keys[None, :] == queries
    return ((valid[:, None, :total] & causal[None]) | own[None])[:, None]


def grouped_attention(q, k, v, mask):
    """Scaled dot-product attention with key/value heads shared by groups of query heads."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Target:
    """The target Llama in f32: forward over a KV cache, returning post-norm hidden states
    (the features EAGLE-1 reads) and logits through the tied embedding."""

    def __init__(self, shape: LlamaShape, weights: dict[str, np.ndarray], device: torch.device):
        self.shape = shape
        self.device = device

        def t(name):
            return torch.from_numpy(weights[name]).to(device)

        self.embed = t("embed_tokens")
        self.lm_head = t("lm_head") if "lm_head" in weights else self.embed
        self.norm = t("norm")
        self.layers = []
        for i in range(shape.num_hidden_layers):
            p = f"layers.{i}."
            names = list(GGUF_NAMES.values())
            self.layers.append({n: t(p + n) for n in names})

    @classmethod
    def load(cls, gguf_path: str, device: torch.device) -> "Target":
        shape, weights = read_gguf(gguf_path)
        return cls(shape, weights, device)

    def new_cache(self, batch: int, capacity: int) -> KvCache:
        s = self.shape
        return KvCache(s.num_hidden_layers, batch, s.num_key_value_heads, capacity, s.head_dim, self.device)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KvCache, valid: torch.Tensor) -> torch.Tensor:
        """Runs `ids` [B, T] at positions `pos` into slots cache.length.. (`valid` [B, T] marks
        real tokens); returns post-norm hidden states [B, T, hidden]."""
        s = self.shape
        b, n = ids.shape
        start = cache.length
        cache.valid[:, start : start + n] = valid
        mask = attention_mask(cache.valid, start, n)
        cos, sin = rope_tables(pos, s.head_dim, s.rope_theta)
        x = self.embed[ids]
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w["input_layernorm"], s.rms_norm_eps)
            q = (h @ w["q_proj"].T).view(b, n, s.num_attention_heads, s.head_dim).transpose(1, 2)
            k = (h @ w["k_proj"].T).view(b, n, s.num_key_value_heads, s.head_dim).transpose(1, 2)
            v = (h @ w["v_proj"].T).view(b, n, s.num_key_value_heads, s.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.k[i, :, :, start : start + n] = k
            cache.v[i, :, :, start : start + n] = v
            a = grouped_attention(q, cache.k[i, :, :, : start + n], cache.v[i, :, :, : start + n], mask)
            x = x + a.transpose(1, 2).reshape(b, n, -1) @ w["o_proj"].T
            h = rms_norm(x, w["post_attention_layernorm"], s.rms_norm_eps)
            x = x + (F.silu(h @ w["gate_proj"].T) * (h @ w["up_proj"].T)) @ w["down_proj"].T
        cache.length = start + n
        return rms_norm(x, self.norm, s.rms_norm_eps)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.lm_head.T


@torch.no_grad()
def generate(target: Target, prompts: list[list[int]], max_new: int, temperature: float, rng: torch.Generator):
    """Generates from a batch of prompts (left-padded) until EOS or `max_new` tokens.
    Returns, per prompt, (all token ids, features [n, hidden] on the CPU, prompt length):
    the feature of every token, generated ones included, as the target computed it."""
    dev = target.device
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    ids = torch.full((b, longest), target.shape.eos_token_id, dtype=torch.long)
    valid = torch.zeros(b, longest, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p) :] = torch.tensor(p)
        valid[r, longest - len(p) :] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    ids, valid, pos = ids.to(dev), valid.to(dev), pos.to(dev)
    cache = target.new_cache(b, longest + max_new)
    feats = [target.forward(ids, pos, cache, valid)]
    next_pos = pos[:, -1:] + 1
    tokens, done = [], torch.zeros(b, dtype=torch.bool, device=dev)
    for _ in range(max_new):
        logits = target.logits(feats[-1][:, -1])
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=rng).squeeze(1)
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, target.shape.eos_token_id), tok)
        tokens.append(torch.where(done, torch.full_like(tok, -1), tok))
        feats.append(target.forward(tok[:, None], next_pos, cache, ~done[:, None]))
        next_pos = next_pos + 1
        done |= tok == target.shape.eos_token_id
        if bool(done.all()):
            break
    gen = torch.stack(tokens, 1).cpu()
    allf = torch.cat(feats, 1).cpu()
    out = []
    for r, p in enumerate(prompts):
        g = gen[r][gen[r] >= 0].tolist()
        f = allf[r, longest - len(p) : longest + len(g)]
        out.append((list(p) + g, f, len(p)))
    return out


# ----------------------------------------------------------------------------------------
# The EAGLE-1 head


def Linear(fan_in: int, fan_out: int, bias: bool = False) -> nn.Linear:  # noqa: N802 (reads as a layer)
    return nn.Linear(fan_in, fan_out, bias=bias)


class HeadAttention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.q_proj = Linear(s.hidden_size, s.num_attention_heads * s.head_dim)
        self.k_proj = Linear(s.hidden_size, s.num_key_value_heads * s.head_dim)
        self.v_proj = Linear(s.hidden_size, s.num_key_value_heads * s.head_dim)
        self.o_proj = Linear(s.num_attention_heads * s.head_dim, s.hidden_size)


class HeadMlp(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = Linear(s.hidden_size, s.intermediate_size)
        self.up_proj = Linear(s.hidden_size, s.intermediate_size)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size)


class HeadLayer(nn.Module):
    """A Llama decoder layer without input_layernorm (EAGLE-1's layer 0)."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.self_attn = HeadAttention(s)
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = nn.Parameter(torch.ones(s.hidden_size))
        self.mlp = HeadMlp(s)


class EagleHead(nn.Module):
    """fc(concat(embedding of token t+1, feature f_t)) -> one decoder layer -> predicted f_{t+1}.

    Parameter names are those of SafeAILab/EAGLE's cnets.py (EAGLE-1), without the embedding
    (shared with the target). Draft logits are the target's LM head over the output."""

    def __init__(self, s: LlamaShape, fc_bias: bool = True):
        super().__init__()
        self.shape = s
        self.fc = Linear(2 * s.hidden_size, s.hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList([HeadLayer(s)])

    # The layer in three parts, so that training can mix keys from several unrolled steps.
    def qkv(self, tokens_emb, features, pos):
        s, attn = self.shape, self.layers[0].self_attn
        b, n, _ = features.shape
        x = self.fc(torch.cat([tokens_emb, features], dim=-1))
        q = attn.q_proj(x).view(b, n, s.num_attention_heads, s.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        cos, sin = rope_tables(pos, s.head_dim, s.rope_theta)
        return x, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x, attn_out):
        layer = self.layers[0]
        b, _, n, _ = attn_out.shape
        x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, n, -1))
        h = rms_norm(x, layer.post_attention_layernorm.weight, self.shape.rms_norm_eps)
        mlp = layer.mlp
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))

    def forward_cached(self, tokens_emb, features, pos, cache: KvCache):
        """Inference: entries at slots cache.length.. (one row), attending causally."""
        x, q, k, v = self.qkv(tokens_emb, features, pos)
        start, n = cache.length, features.shape[1]
        cache.k[0, :, :, start : start + n] = k
        cache.v[0, :, :, start : start + n] = v
        cache.valid[:, start : start + n] = True
        mask = attention_mask(cache.valid, start, n)
        a = grouped_attention(q, cache.k[0, :, :, : start + n], cache.v[0, :, :, : start + n], mask)
        cache.length = start + n
        return self.finish(x, a)

    def new_cache(self, capacity: int, device) -> KvCache:
        s = self.shape
        return KvCache(1, 1, s.num_key_value_heads, capacity, s.head_dim, device)


def unrolled_attention(q, keys, values, step: int, lengths_valid: torch.Tensor):
    """Attention of unrolled step `step` (0: the target's own features): a query at entry p
    sees step 0's keys of entries <= p - step (computed from the target's features, as the
    head's cache holds them at inference), then the keys of entry p - step + i from step i,
    i = 1..step (the drafts so far). `keys`/`values`: per step [B, kvh, T, d];
    `lengths_valid` [B, T] marks real (non-padding) entries."""
    groups = q.shape[1] // keys[0].shape[1]
    rep = lambda t: t.repeat_interleave(groups, dim=1)  # noqa: E731
    b, h, n, d = q.shape
    scale = d**-0.5
    k0, v0 = rep(keys[0]), rep(values[0])
    scores = [torch.matmul(q, k0.transpose(-1, -2)) * scale]
    idx = torch.arange(n, device=q.device)
    mask0 = (idx[None, :] <= idx[:, None] - step)[None, None] & lengths_valid[:, None, None, :]
    scores[0] = scores[0].masked_fill(~mask0, float("-inf"))
    shifted_values = []
    for i in range(1, step + 1):
        shift = step - i
        ki, vi = rep(keys[i]), rep(values[i])
        ki = F.pad(ki, (0, 0, shift, 0))[:, :, :n]
        vi = F.pad(vi, (0, 0, shift, 0))[:, :, :n]
        s_i = (q * ki).sum(-1, keepdim=True) * scale
        s_i = s_i.masked_fill((idx < shift)[None, None, :, None], float("-inf"))
        scores.append(s_i)
        shifted_values.append(vi)
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = torch.matmul(probs[..., :n], v0)
    for i, vi in enumerate(shifted_values):
        out = out + probs[..., n + i : n + i + 1] * vi
    return out


def head_config(s: LlamaShape, target_name: str, target_file: str, fc_bias: bool, dtype: str, extra: dict) -> dict:
    return {
        "architectures": ["EagleLlamaForCausalLM"],
        "model_type": "llama",
        "eagle_version": 1,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "vocab_size": s.vocab_size,
        "tie_word_embeddings": True,
        "fc_bias": fc_bias,
        "torch_dtype": dtype,
        "target": {"name": target_name, "file": target_file},
        **extra,
    }


def save_head(head: EagleHead, folder: str, config: dict, dtype=torch.float16):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def load_head(folder: str, device) -> EagleHead:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    s = LlamaShape(
        hidden_size=c["hidden_size"],
        num_hidden_layers=1,
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        intermediate_size=c["intermediate_size"],
        rope_theta=c["rope_theta"],
        rms_norm_eps=c["rms_norm_eps"],
        vocab_size=c["vocab_size"],
        eos_token_id=-1,
    )
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    head = EagleHead(s, fc_bias="fc.bias" in tensors)
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.to(device).eval()
