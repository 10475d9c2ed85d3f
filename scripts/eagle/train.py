"""Trains an EAGLE-1 draft head for a GGUF Llama target by self-distillation.

1. Data: the target answers the training prompts (greedy, and sampled at --temperature);
   every token's last-layer hidden state after the final norm is kept as its feature.
2. Training: the head reads (embedding of token t+1, feature f_t) and predicts f_{t+1};
   loss = smooth-L1(predicted, f_{t+1}) + 0.1 x cross-entropy of the LM head over the
   prediction against the target's distribution at t+1 (EAGLE's loss). With --unroll N the
   head is also trained on its own predicted features, N-1 further steps, attending as it
   does at inference (earlier entries from the target's features, the last ones from its
   own drafts), which keeps its accuracy up deeper into a draft chain.

    python scripts/eagle/train.py --gguf MODEL.gguf --prompts .dev/eagle-data/prompts.json \
        --out models/eagle/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import EagleHead, Target, generate, head_config, load_head, pick_device, save_head, unrolled_attention  # noqa: E402

VALIDATION_PROMPTS = 64


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(target: Target, prompts: list[list[int]], args, rng: torch.Generator) -> list[tuple]:
    """(token ids, features f16, prompt length) for greedy and sampled answers of each prompt."""
    out = []
    temps = [0.0] + [args.temperature] * args.samples
    for temp in temps:
        for i in range(0, len(prompts), args.gen_batch):
            batch = prompts[i : i + args.gen_batch]
            for ids, feats, plen in generate(target, batch, args.max_new, temp, rng):
                out.append((torch.tensor(ids), feats.half(), plen))
            log(f"  generated at T={temp}: {len(out)} sequences so far")
    return out


def batches(data: list[tuple], tokens_per_batch: int, shuffle: random.Random | None):
    """Groups sequences of similar length into batches of about `tokens_per_batch` tokens."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    groups, cur, longest = [], [], 0
    for i in order:
        longest = max(longest, len(data[i][0]))
        if cur and longest * (len(cur) + 1) > tokens_per_batch:
            groups.append(cur)
            cur, longest = [], len(data[i][0])
        cur.append(i)
    if cur:
        groups.append(cur)
    if shuffle:
        shuffle.shuffle(groups)
    return groups


def collate(data, group, device):
    """Head entries p = 0..n-2: input (token p+1, feature p), target feature p+1."""
    n = max(len(data[i][0]) for i in group)
    b = len(group)
    hidden = data[group[0]][1].shape[1]
    ids = torch.zeros(b, n, dtype=torch.long)
    feats = torch.zeros(b, n, hidden)
    mask = torch.zeros(b, n - 1, dtype=torch.bool)
    valid = torch.zeros(b, n - 1, dtype=torch.bool)
    first = torch.zeros(b, dtype=torch.long)
    for r, i in enumerate(group):
        toks, f, plen = data[i]
        ids[r, : len(toks)] = toks
        feats[r, : len(toks)] = f.float()
        valid[r, : len(toks) - 1] = True
        mask[r, plen - 1 : len(toks) - 1] = True
        first[r] = plen - 1
    return ids.to(device), feats.to(device), mask.to(device), valid.to(device), first.to(device)


def unrolled_losses(head: EagleHead, embed, batch, steps: int, noise: float):
    """Per unrolled step: (regression loss, distillation loss, top-1 accuracy, entries)."""
    ids, feats, mask, valid, first = batch
    b, n1 = mask.shape
    emb = embed[ids[:, 1:]]
    target = feats[:, 1:]
    pos = torch.arange(n1, device=ids.device).expand(b, n1)
    inputs = feats[:, :-1]
    if noise > 0:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * 2 * noise
    keys, values, out = [], [], []
    for j in range(steps):
        x, q, k, v = head.qkv(emb, inputs, pos)
        keys.append(k)
        values.append(v)
        pred = head.finish(x, unrolled_attention(q, keys, values, j, valid))
        # Entry p at step j drafts as if the target's last feature were at p - j.
        m = mask & (pos - j >= first[:, None])
        p, t = pred[m], target[m]
        vloss = F.smooth_l1_loss(p, t)
        with torch.no_grad():
            t_logits = t @ embed.T
            t_prob = torch.softmax(t_logits, dim=-1)
        logp = torch.log_softmax(p @ embed.T, dim=-1)
        ploss = -(t_prob * logp).sum(-1).mean()
        acc = (logp.argmax(-1) == t_logits.argmax(-1)).float().mean()
        out.append((vloss, ploss, acc, int(m.sum())))
        inputs = F.pad(pred, (0, 0, 1, 0))[:, :-1]  # entry p reads the prediction made at p-1
    return out


@torch.no_grad()
def validate(head, embed, data, device, steps, tokens_per_batch):
    """Top-1 agreement with the target at each draft depth, given the earlier drafts were
    right, and the tokens per target step that a chain of k would give."""
    head.eval()
    hits, counts = [0.0] * steps, [0] * steps
    for group in batches(data, tokens_per_batch, None):
        for j, (_, _, acc, cnt) in enumerate(unrolled_losses(head, embed, collate(data, group, device), steps, 0.0)):
            hits[j] += float(acc) * cnt
            counts[j] += cnt
    head.train()
    acc = [h / max(c, 1) for h, c in zip(hits, counts)]
    tps, reach = {}, 1.0
    total = 1.0
    for k in range(1, steps + 1):
        reach *= acc[k - 1]
        total += reach
        tps[k] = total
    return acc, tps


def train(head, embed, train_data, val_data, args, device):
    """AdamW with warm-up and cosine decay, over --epochs or, with --minutes, a time budget."""
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    shuffle = random.Random(args.seed)
    per_epoch = len(batches(train_data, args.batch_tokens, None))
    total = per_epoch * args.epochs
    warmup = 100
    weights = [args.step_decay**j for j in range(args.unroll)]
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cpu")
    log(f"{per_epoch} batches per epoch; bf16 autocast {'on' if use_bf16 else 'off'}")
    history, step, t0 = [], 0, time.time()

    def progress():
        return (time.time() - t0) / (60 * args.minutes) if args.minutes else step / total

    epoch = 0
    while progress() < 1:
        epoch += 1
        sums, seen = [[0.0, 0.0, 0.0] for _ in range(args.unroll)], 0
        for group in batches(train_data, args.batch_tokens, shuffle):
            frac = min(progress(), 1.0)
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                parts = unrolled_losses(head, embed, collate(train_data, group, device), args.unroll, args.noise)
            loss = sum(w * (v + args.ce_weight * p) for w, (v, p, _, _) in zip(weights, parts)) / sum(weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), args.clip)
            opt.step()
            for s, (v, p, a, _) in zip(sums, parts):
                s[0] += v.item()
                s[1] += p.item()
                s[2] += a.item()
            step += 1
            seen += 1
            if progress() >= 1:
                break
        acc, tps = validate(head, embed, val_data, device, max(args.unroll, 6), args.batch_tokens)
        row = {
            "epoch": epoch,
            "step": step,
            "minutes": round((time.time() - t0) / 60, 2),
            "train_smooth_l1": [round(s[0] / seen, 4) for s in sums],
            "train_ce": [round(s[1] / seen, 4) for s in sums],
            "train_top1": [round(s[2] / seen, 4) for s in sums],
            "val_top1_by_depth": [round(a, 4) for a in acc],
            "val_tokens_per_step_chain": {k: round(v, 3) for k, v in tps.items()},
        }
        history.append(row)
        log(json.dumps(row))
    return history, time.time() - t0


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the target model")
    ap.add_argument("--prompts", default=".dev/eagle-data/prompts.json", help="from prompts.py")
    ap.add_argument("--out", default="models/eagle/smollm2-135m-instruct", help="folder for model.safetensors + config.json")
    ap.add_argument("--target-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--categories", default="", help="only training prompts of these categories (comma-separated)")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training prompts (0: all)")
    ap.add_argument("--max-new", type=int, default=128, help="tokens generated per answer")
    ap.add_argument("--temperature", type=float, default=0.7, help="of the sampled answers")
    ap.add_argument("--samples", type=int, default=1, help="sampled answers per prompt, besides the greedy one")
    ap.add_argument("--gen-batch", type=int, default=16, help="prompts generated together")
    ap.add_argument("--log", default=".dev/eagle-data/train_log.json", help="per-epoch losses and validation")
    ap.add_argument("--data-cache", default="", help="save the generated data here (a .pt file), or load it from here (several: comma-separated)")
    ap.add_argument("--data-only", action="store_true", help="stop once the data is generated (and cached)")
    ap.add_argument("--init", default="", help="start from this head (a folder) instead of random weights")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=0, help="train for this long instead of --epochs")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast for training (auto: on a CPU, where it is several times faster)")
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--ce-weight", type=float, default=0.1, help="weight of the distillation loss")
    ap.add_argument("--unroll", type=int, default=3, help="training steps on the head's own features (1: EAGLE-1)")
    ap.add_argument("--step-decay", type=float, default=0.8, help="loss weight of unrolled step j is this ** j")
    ap.add_argument("--noise", type=float, default=0.0, help="uniform noise on the target's features")
    ap.add_argument("--no-fc-bias", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the target's features stay f32-exact
    wall = time.time()
    log(f"loading {args.gguf} on {device}")
    target = Target.load(args.gguf, device)
    with open(args.prompts) as f:
        cats = set(args.categories.split(",")) if args.categories else None
        prompts = [p["ids"] for p in json.load(f)["train"] if cats is None or p["category"] in cats]
    random.Random(args.seed).shuffle(prompts)
    val_prompts, train_prompts = prompts[:VALIDATION_PROMPTS], prompts[VALIDATION_PROMPTS:]
    if args.limit:
        train_prompts = train_prompts[: args.limit]

    caches = [c for c in args.data_cache.split(",") if c]
    if caches and all(os.path.exists(c) for c in caches):
        train_data, val_data = [], []
        for c in caches:
            t, v = torch.load(c)
            train_data += t
            val_data += v
        log(f"loaded {len(train_data)} + {len(val_data)} sequences from {args.data_cache}")
    else:
        rng = torch.Generator(device=device).manual_seed(args.seed)
        t = time.time()
        log(f"generating answers to {len(train_prompts)} training prompts")
        train_data = make_data(target, train_prompts, args, rng)
        val_data = [x for b in range(0, len(val_prompts), args.gen_batch)
                    for x in generate(target, val_prompts[b : b + args.gen_batch], args.max_new, 0.0, rng)]
        val_data = [(torch.tensor(i), f.half(), p) for i, f, p in val_data]
        log(f"data generated in {time.time() - t:.0f} s")
        if caches:
            torch.save((train_data, val_data), caches[0])
    data_minutes = (time.time() - wall) / 60
    if args.data_only:
        return
    gen_tokens = sum(len(i) - p for i, _, p in train_data)
    log(f"train: {len(train_data)} sequences, {gen_tokens} answer tokens; validation: {len(val_data)} sequences")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training may round
    head = EagleHead(target.shape, fc_bias=not args.no_fc_bias).to(device)
    if args.init:
        head = load_head(args.init, device).train()
        log(f"starting from {args.init}")
    embed = target.embed
    history, seconds = train(head, embed, train_data, val_data, args, device)
    last = history[-1]
    stage = {
        "prompts": len({tuple(i[:p].tolist()) for i, _, p in train_data}),
        "sequences": len(train_data),
        "answer_tokens": gen_tokens,
        "max_new_tokens": args.max_new,
        "data_cache": args.data_cache or None,  # when set, the answers may come from an earlier run's settings
        "sampled_answers_per_prompt": args.samples,
        "sampled_temperature": args.temperature,
        "epochs": len(history),
        "steps": last["step"],
        "lr": args.lr,
        "batch_tokens": args.batch_tokens,
        "unroll": args.unroll,
        "device": str(device),
        "bf16_autocast": args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cpu"),
        "init": args.init or None,
        "train_minutes": round(seconds / 60, 2),
        "validation_top1_by_depth": last["val_top1_by_depth"],
        "validation_tokens_per_step_chain": last["val_tokens_per_step_chain"],
    }
    stages = []
    if args.init:
        with open(os.path.join(args.init, "config.json")) as f:
            previous = json.load(f).get("training", {})
        stages = previous.get("stages", [previous] if previous else [])
    training = {"training": {"stages": stages + [stage]}}
    config = head_config(target.shape, args.target_name, os.path.basename(args.gguf), not args.no_fc_bias, "float16", training)
    save_head(head, args.out, config)
    if args.log:
        os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
        with open(args.log, "w") as f:
            json.dump(history, f, indent=1)
    log(f"saved {args.out}: data {data_minutes:.1f} min, training {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
