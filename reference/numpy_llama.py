#!/usr/bin/env python3
"""Independent float64 numpy reference for a llama-architecture GGUF (SmolLM2-135M-Instruct Q4_1).

Nothing here is shared with the Rust code in `src/`. It reads the GGUF with the `gguf` package
(only for the container: metadata and raw tensor bytes), dequantizes the GGML blocks itself, runs
the Llama forward in float64 numpy, tokenizes with its own byte-level BPE, and writes golden data:

    python reference/numpy_llama.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/golden

Written files (in --out):
    smollm2.json              cases, greedy ids, per-step top-5, tokenizer cases, checks
    <case>.prefill.f32        logits at the last prompt position (forward over prompt_ids)
    <case>.final.f32          logits at the last position of the forward over
                              prompt_ids + greedy_ids[:-1] (its argmax is greedy_ids[-1])
Logits files are raw little-endian float32, vocab_size values each.

RoPE: llama.cpp's converter permutes the rows of attn_q / attn_k so that its interleaved
(GPT-J style, pairs (2i, 2i+1)) RoPE applies. The main path undoes that permutation and uses the
Hugging Face rotate_half RoPE (pairs (i, i + head_dim/2)); the check path keeps the GGUF layout and
uses interleaved RoPE. The two must agree to rounding, and the script asserts that they do.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import regex  # the `regex` module: supports \p{L} / \p{N}

import gguf  # only for GGUFReader (container parsing) and, as a cross-check, gguf.quants

GGML_Q4_1 = 3
GGML_Q8_0 = 8
GGML_F32 = 0


# ----------------------------------------------------------------------------------------------
# GGUF loading and dequantization (own implementation of the GGML block formats)
# ----------------------------------------------------------------------------------------------


def dequant_q4_1(raw, n):
    """Q4_1 block: f16 d, f16 m, 16 bytes of nibbles; x[j] = d*lo(qs[j]) + m, x[j+16] = d*hi(qs[j]) + m."""
    b = np.ascontiguousarray(raw).reshape(-1, 20)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)  # (nblk, 1)
    m = b[:, 2:4].copy().view("<f2").astype(np.float64)
    qs = b[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)  # (nblk, 32)
    return (d * q + m).reshape(-1)[:n]


def dequant_q8_0(raw, n):
    """Q8_0 block: f16 d, 32 int8; x[j] = d*q[j]."""
    b = np.ascontiguousarray(raw).reshape(-1, 34)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)
    q = b[:, 2:34].copy().view(np.int8).astype(np.float64)
    return (d * q).reshape(-1)[:n]


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def load_gguf(path, check_dequant=True):
    """Returns (config dict, {tensor name: float64 array in numpy row-major (out, in) layout}, reader)."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    assert arch == "llama", arch
    cfg = {
        "n_layer": int(field(r, "llama.block_count")),
        "n_embd": int(field(r, "llama.embedding_length")),
        "n_ff": int(field(r, "llama.feed_forward_length")),
        "n_head": int(field(r, "llama.attention.head_count")),
        "n_head_kv": int(field(r, "llama.attention.head_count_kv")),
        "rope_theta": float(field(r, "llama.rope.freq_base")),
        "eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
    }
    cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    assert "llama.rope.scaling.type" not in r.fields, "rope scaling not handled"

    weights = {}
    max_dq_diff = 0.0
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml ne[] is innermost-first
        n = int(np.prod(shape))
        tt = int(t.tensor_type)
        if tt == GGML_F32:
            w = np.asarray(t.data, dtype=np.float32).astype(np.float64).reshape(-1)
        elif tt == GGML_Q4_1:
            w = dequant_q4_1(t.data, n)
        elif tt == GGML_Q8_0:
            w = dequant_q8_0(t.data, n)
        else:
            raise ValueError(f"{t.name}: unsupported tensor type {t.tensor_type.name}")
        w = w.reshape(shape)
        if check_dequant and tt != GGML_F32:
            other = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
            max_dq_diff = max(max_dq_diff, float(np.max(np.abs(other - w))))
        weights[t.name] = w
    cfg["vocab"] = weights["token_embd.weight"].shape[0]
    cfg["max_dequant_diff_vs_gguf_py"] = max_dq_diff
    return cfg, weights, r


def unpermute(w, n_head):
    """Undo llama.cpp convert's permute (HF `reverse_permute`): GGUF row order -> HF row order."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class Llama:
    def __init__(self, cfg, weights, rope_style):
        """rope_style: 'half' (un-permuted q/k, HF rotate_half) or 'interleaved' (GGUF layout, GPT-J pairs)."""
        assert rope_style in ("half", "interleaved")
        self.cfg, self.rope_style = cfg, rope_style
        self.embd = weights["token_embd.weight"]  # (vocab, n_embd); also the (tied) LM head
        self.head = weights.get("output.weight", self.embd)
        self.out_norm = weights["output_norm.weight"]
        self.layers = []
        for i in range(cfg["n_layer"]):
            g = lambda n: weights[f"blk.{i}.{n}.weight"]  # noqa: E731
            wq, wk = g("attn_q"), g("attn_k")
            if rope_style == "half":
                wq, wk = unpermute(wq, cfg["n_head"]), unpermute(wk, cfg["n_head_kv"])
            self.layers.append(
                dict(attn_norm=g("attn_norm"), wq=wq, wk=wk, wv=g("attn_v"), wo=g("attn_output"),
                     ffn_norm=g("ffn_norm"), gate=g("ffn_gate"), up=g("ffn_up"), down=g("ffn_down"))
            )
        d = cfg["head_dim"]
        self.inv_freq = cfg["rope_theta"] ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)

    def rms_norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg["eps"]) * w

    def rope(self, x, pos):
        """x: (T, H, D), pos: (T,) absolute positions."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]  # (T, D/2)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if self.rope_style == "half":  # pairs (i, i + D/2)
            h = x.shape[-1] // 2
            x1, x2 = x[..., :h], x[..., h:]
            return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i + 1)
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out

    def new_cache(self):
        return [{"k": None, "v": None} for _ in self.layers]

    def forward(self, ids, start_pos=0, cache=None):
        """Logits (T, vocab) for tokens `ids` at positions start_pos.. ; `cache` (optional) holds K/V
        of the earlier positions and is extended in place."""
        c = self.cfg
        T, H, KV, D = len(ids), c["n_head"], c["n_head_kv"], c["head_dim"]
        pos = np.arange(start_pos, start_pos + T)
        x = self.embd[np.asarray(ids)]  # (T, n_embd)
        for li, L in enumerate(self.layers):
            h = self.rms_norm(x, L["attn_norm"])
            q = self.rope((h @ L["wq"].T).reshape(T, H, D), pos)
            k = self.rope((h @ L["wk"].T).reshape(T, KV, D), pos)
            v = (h @ L["wv"].T).reshape(T, KV, D)
            if cache is not None:
                if cache[li]["k"] is not None:
                    k = np.concatenate([cache[li]["k"], k], axis=0)
                    v = np.concatenate([cache[li]["v"], v], axis=0)
                cache[li]["k"], cache[li]["v"] = k, v
            S = k.shape[0]  # total keys = start_pos + T
            kpos = np.arange(S)
            mask = np.where(kpos[None, :] <= pos[:, None], 0.0, -np.inf)  # (T, S) causal
            rep = H // KV
            kh = np.repeat(k, rep, axis=1)  # query head j uses kv head j // rep
            vh = np.repeat(v, rep, axis=1)
            scores = np.einsum("thd,shd->hts", q, kh) / np.sqrt(D) + mask[None]
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            attn = np.einsum("hts,shd->thd", p, vh).reshape(T, H * D)
            x = x + attn @ L["wo"].T
            h = self.rms_norm(x, L["ffn_norm"])
            g = h @ L["gate"].T
            u = h @ L["up"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ L["down"].T  # SwiGLU: silu(gate) * up
        x = self.rms_norm(x, self.out_norm)
        return x @ self.head.T


# ----------------------------------------------------------------------------------------------
# Tokenizer: GPT-2 byte-level BPE, llama.cpp "smollm" pre-tokenizer, own implementation
# ----------------------------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: first "\p{N}" (each digit its own piece), then the GPT-2
# pattern. (HF's ByteLevel pattern ends with an extra "|\s+", which llama.cpp gets implicitly by
# keeping unmatched text as its own piece; it is included here.)
DIGIT_RE = regex.compile(r"\p{N}")
GPT2_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def split_keep(pattern, text):
    """Split `text` into matches of `pattern` and the unmatched stretches between them, in order."""
    out, last = [], 0
    for m in pattern.finditer(text):
        if m.start() > last:
            out.append(text[last:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        last = m.end()
    if last < len(text):
        out.append(text[last:])
    return out


class BPETokenizer:
    def __init__(self, reader):
        self.tokens = list(field(reader, "tokenizer.ggml.tokens"))
        types = list(field(reader, "tokenizer.ggml.token_type"))
        merges = list(field(reader, "tokenizer.ggml.merges"))
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        assert field(reader, "tokenizer.ggml.pre") == "smollm", field(reader, "tokenizer.ggml.pre")
        self.add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token"))
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.b2u = bytes_to_unicode()
        self.u2b = {c: b for b, c in self.b2u.items()}
        # CONTROL (3) and USER_DEFINED (4) tokens are matched whole in the text.
        self.special = {t: i for i, (t, ty) in enumerate(zip(self.tokens, types)) if ty in (3, 4)}
        alts = sorted(self.special, key=len, reverse=True)
        self.special_re = regex.compile("|".join(regex.escape(s) for s in alts)) if alts else None
        self.cache = {}

    def bpe(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        word = [self.b2u[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best, best_rank = None, None
            for i in range(len(word) - 1):
                r = self.ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = word[best], word[best + 1]
            merged, i = [], 0
            while i < len(word):  # merge every (a, b) occurrence, left to right
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab[w] for w in word]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        assert not self.add_bos
        ids = []
        segments = split_keep(self.special_re, text) if self.special_re else [text]
        for seg in segments:
            if seg in self.special:
                ids.append(self.special[seg])
                continue
            for chunk in split_keep(DIGIT_RE, seg):
                for piece in GPT2_RE.findall(chunk):
                    ids.extend(self.bpe(piece))
        return ids

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            if i in self.special.values():
                out += t.encode("utf-8")
            else:
                out += bytes(self.u2b[c] for c in t)
        return out.decode("utf-8", errors="replace")


def hf_tokenizers_crosscheck(tok):
    """The same tokenizer built with the `tokenizers` package (as SmolLM2's tokenizer.json does:
    Digits(individual) + ByteLevel pre-tokenizer), or None if the package is missing."""
    try:
        from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, decoders
    except ImportError:
        return None
    merges = sorted(tok.ranks, key=tok.ranks.get)
    t = Tokenizer(models.BPE(vocab=dict(tok.vocab), merges=merges))
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in sorted(tok.special, key=tok.special.get)])
    return t


def render_chat(reader, user):
    import jinja2

    tmpl = field(reader, "tokenizer.chat_template")
    # Same Environment options transformers uses for apply_chat_template.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tmpl).render(messages=[{"role": "user", "content": user}], add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Golden generation
# ----------------------------------------------------------------------------------------------

CASES = [
    ("raw_france", False, "The capital of France is"),
    ("raw_fib", False, "def fibonacci(n):"),
    ("chat_france", True, "What is the capital of France?"),
    ("chat_haiku", True, "Write a haiku about the sea."),
]

TOKENIZER_TEXTS = [
    "Hello, world!",
    "café naïve résumé Ångström façade",
    "Ünïcödé ΑΒΓ αβγ Привет мир",
    "日本語のテキスト、中文测试。한국어",
    "emoji: 🙂🚀👍🏽 ❤️ ok",
    "12345 3.14159",
    "Version 2.0.1 released in 2024, costs $1,999.99!",
    "def foo(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "col1\tcol2\t\tcol3\n\tindented",
    "line one\n\nline three\r\nend\n\n\n",
    "multiple   spaces    here  ",
    "  leading and trailing  ",
    "I'm sure they'll say it's fine; we've done it, haven't we? DON'T",
    "x=1+2==3!=4 && y->z // comment /* c */ {a:[1,2]}",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nx<|im_end|>\n<|endoftext|>tail <|im_end|>",
    "https://example.com/path?q=a&b=c#frag",
]

NEAR_TIE = 1e-3


def top5(logits):
    idx = np.argsort(-logits, kind="stable")[:5]
    return [int(i) for i in idx], [float(logits[i]) for i in idx]


def run_case(model_a, model_b, tok, name, chat, prompt, reader, n_gen, out_dir, log):
    rendered = render_chat(reader, prompt) if chat else prompt
    prompt_ids = tok.encode(rendered)
    t0 = time.time()

    # Main path: rotate_half model with a KV cache.
    cache = model_a.new_cache()
    logits = model_a.forward(prompt_ids, 0, cache)[-1]
    prefill = logits.copy()
    greedy, steps, near = [], [], []
    for s in range(n_gen):
        ids5, vals5 = top5(logits)
        gap = vals5[0] - vals5[1]
        steps.append({"top5_ids": ids5, "top5_logits": vals5, "gap": gap})
        if gap < NEAR_TIE:
            near.append(s)
        nxt = int(np.argmax(logits))
        greedy.append(nxt)
        if s + 1 < n_gen:
            logits = model_a.forward([nxt], len(prompt_ids) + s, cache)[-1]
    cached_final = logits

    # The final forward, literally: full sequence prompt_ids + greedy_ids[:-1], no cache.
    seq = prompt_ids + greedy[:-1]
    final = model_a.forward(seq)[-1]
    assert int(np.argmax(final)) == greedy[-1]
    # Self-consistency: GGUF layout + interleaved RoPE must give the same logits.
    final_b = model_b.forward(seq)[-1]
    prefill_b = model_b.forward(prompt_ids)[-1]

    checks = {
        "final_full_vs_kvcache_max_abs_diff": float(np.max(np.abs(final - cached_final))),
        "final_half_vs_interleaved_max_abs_diff": float(np.max(np.abs(final - final_b))),
        "prefill_half_vs_interleaved_max_abs_diff": float(np.max(np.abs(prefill - prefill_b))),
    }
    for k, v in checks.items():
        assert v < 1e-8, (name, k, v)

    prefill.astype("<f4").tofile(os.path.join(out_dir, f"{name}.prefill.f32"))
    final.astype("<f4").tofile(os.path.join(out_dir, f"{name}.final.f32"))
    text = tok.decode(greedy)
    log(f"[{name}] {len(prompt_ids)} prompt tokens, {time.time() - t0:.1f}s; checks {checks}")
    log(f"[{name}] greedy: {text!r}" + (f"  near-ties at {near}" if near else ""))
    case = {
        "name": name,
        "chat": chat,
        "prompt": prompt,
        "rendered": rendered,
        "prompt_ids": prompt_ids,
        "greedy_ids": greedy,
        "greedy_text": text,
        "prefill_logits_file": f"{name}.prefill.f32",
        "final_logits_file": f"{name}.final.f32",
        "prefill_top5_ids": steps[0]["top5_ids"],
        "final_top5_ids": top5(final)[0],
        "near_ties": near,
        "min_gap": min(s["gap"] for s in steps),
        "steps": steps,
        "checks": checks,
    }
    return case


def wrong_rope_probe(cfg, weights, tok, reader):
    """Shows the mismatched combination (GGUF layout with rotate_half) is measurably different."""
    m = Llama(cfg, weights, "interleaved")
    m.rope_style = "half"  # deliberately wrong pairing for the GGUF row order
    ids = tok.encode(render_chat(reader, "What is the capital of France?"))
    cache = m.new_cache()
    logits = m.forward(ids, 0, cache)[-1]
    out = []
    for s in range(12):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        logits = m.forward([nxt], len(ids) + s, cache)[-1]
    return tok.decode(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-gen", type=int, default=40)
    ap.add_argument("--skip-wrong-rope-probe", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    with open(args.gguf, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    t0 = time.time()
    cfg, weights, reader = load_gguf(args.gguf)
    log(f"loaded {args.gguf} in {time.time() - t0:.1f}s; cfg {cfg}")
    assert cfg["max_dequant_diff_vs_gguf_py"] < 1e-6
    tok = BPETokenizer(reader)
    model_a = Llama(cfg, weights, "half")
    model_b = Llama(cfg, weights, "interleaved")

    cases = [run_case(model_a, model_b, tok, n, c, p, reader, args.n_gen, args.out, log) for n, c, p in CASES]

    # Tokenizer cases (own BPE), plus the rendered golden prompts.
    texts = TOKENIZER_TEXTS + [c["rendered"] for c in cases]
    tok_cases = []
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t, t
        tok_cases.append({"text": t, "ids": ids})
    hf = hf_tokenizers_crosscheck(tok)
    disagreements = []
    if hf is not None:
        for c in tok_cases:
            other = hf.encode(c["text"], add_special_tokens=False).ids
            if other != c["ids"]:
                disagreements.append({"text": c["text"], "own": c["ids"], "tokenizers": other})
        log(f"tokenizer cross-check vs `tokenizers` package: {len(disagreements)} disagreement(s)")

    verification = {
        "rope": "main path: attn_q/attn_k rows un-permuted (HF reverse_permute) + rotate_half RoPE; "
        "check path: GGUF row order + interleaved RoPE; per-case max abs logit diffs in cases[].checks",
        "kv_cache": "greedy decode uses a KV cache; final logits come from a full re-forward and are compared",
        "dequant": "own Q4_1/Q8_0 dequant (exact in float64) vs gguf.quants.dequantize (float32): "
        f"max abs diff {cfg['max_dequant_diff_vs_gguf_py']:.3g}",
        "tokenizer": "own byte-level BPE (llama.cpp 'smollm' pre-tokenizer: \\p{N} split, then GPT-2 regex); "
        + (f"cross-checked against the `tokenizers` package: {len(disagreements)} disagreement(s)"
           if hf is not None else "no cross-check (`tokenizers` not installed)"),
    }
    if not args.skip_wrong_rope_probe:
        verification["wrong_rope_probe_chat_france"] = wrong_rope_probe(cfg, weights, tok, reader)
        log(f"wrong RoPE pairing (GGUF rows + rotate_half) says: {verification['wrong_rope_probe_chat_france']!r}")

    doc = {
        "model_file": os.path.basename(args.gguf),
        "model_sha256": sha,
        "generator": "reference/numpy_llama.py (numpy float64)",
        "logits_format": f"raw little-endian float32, {cfg['vocab']} values",
        "n_gen": args.n_gen,
        "near_tie_threshold": NEAR_TIE,
        "config": {k: v for k, v in cfg.items() if k != "max_dequant_diff_vs_gguf_py"},
        "verification": verification,
        "cases": cases,
        "tokenizer_cases": tok_cases,
        "tokenizer_disagreements": disagreements,
    }
    with open(os.path.join(args.out, "smollm2.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log(f"wrote {args.out}/smollm2.json in {time.time() - t0:.1f}s total")


if __name__ == "__main__":
    main()
