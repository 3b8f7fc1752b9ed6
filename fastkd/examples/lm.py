"""Distilling a small causal language model's logits with FusedLinearSoftTarget.

    python -m fastkd.examples.lm [--steps 200] [--T 2.0] [--hard-weight 0.5] [--topk 0]
                                 [--backend auto] [--device cpu] [--seed 0]

A character-level corpus (the source text of Python's standard library modules that
ship with every install, so nothing is downloaded) trains a teacher transformer
(3 layers, width 128), then two students of width 64 and 2 layers from the same
initial weights and batches: one on the next character alone (cross-entropy), one with
fastkd.FusedLinearSoftTarget on the teacher's LM head, which never materialises either
model's (tokens x vocabulary) logits:

    loss = FusedLinearSoftTarget(T, hard_weight)(h_student, student.head.weight,
                                                 h_teacher, teacher.head.weight, labels)

Padding positions carry label -100 and are left out of both terms. With --topk k the
teacher is given as its top-k log-probabilities instead (as stored offline for large
teachers). Prints each model's held-out cross-entropy (nats per character).
"""
import argparse
import inspect
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastkd

from ..__main__ import device_from

IGNORE = -100


def corpus(chars=400_000):
    """Text of standard-library modules (bytes < 128), and its vocabulary."""
    import collections
    import json
    import textwrap
    parts, total = [], 0
    for module in (collections, json, textwrap, argparse, inspect):
        text = inspect.getsource(module).encode("ascii", "ignore").decode()
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    text = "".join(parts)[:chars]
    vocab = sorted(set(text))
    return text, vocab


class CausalLM(nn.Module):
    """Embedding, pre-norm transformer layers under a causal mask, final norm, LM head."""

    def __init__(self, vocab, width, layers, heads=4, context=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def hidden(self, x):
        """(B, L) ids -> (B, L, width): the states the LM head reads."""
        L = x.shape[1]
        mask = torch.triu(torch.full((L, L), float("-inf"), device=x.device), diagonal=1)
        return self.norm(self.blocks(self.embed(x) + self.pos[:L], mask=mask, is_causal=True))


def batches(ids, batch, context, steps, gen, pad_id):
    """(inputs, labels) of `batch` windows; a quarter of them are cut short and padded, as
    the tail of a document is, and their padded positions carry label IGNORE."""
    n = ids.numel() - context - 1
    for _ in range(steps):
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([ids[s: s + context] for s in starts])
        y = torch.stack([ids[s + 1: s + context + 1] for s in starts])
        short = torch.rand(batch, generator=gen) < 0.25
        lengths = torch.randint(context // 2, context, (batch,), generator=gen)
        pad = short[:, None] & (torch.arange(context)[None, :] >= lengths[:, None])
        yield x.masked_fill(pad, pad_id), y.masked_fill(pad, IGNORE)


def evaluate(model, ids, context, device):
    model.eval()
    with torch.no_grad():
        n = (ids.numel() - 1) // context
        x = ids[: n * context].view(n, context).to(device)
        y = ids[1: n * context + 1].view(n, context).to(device)
        logits = model.head(model.hidden(x))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    model.train()
    return float(loss)


def train(model, ids, args, device, seed, teacher=None, kd=None):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    for step, (x, y) in enumerate(batches(ids, args.batch, args.context, args.steps, gen, pad_id=0)):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = x.to(device), y.to(device)
        h = model.hidden(x)
        if kd is None:
            loss = F.cross_entropy(model.head(h).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        else:
            with torch.no_grad():
                h_t = teacher.hidden(x)
            if args.topk:
                logp = torch.log_softmax(teacher.head(h_t).float(), dim=-1)
                top, idx = logp.topk(args.topk, dim=-1)
                loss = kd(h, model.head.weight, labels=y, teacher_topk_indices=idx, teacher_topk_logprobs=top)
            else:
                loss = kd(h, model.head.weight, h_t, teacher.head.weight.detach(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastkd.examples.lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    p.add_argument("--teacher-steps", type=int, help="the teacher's steps (default 2 x --steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--T", type=float, default=2.0, help="distillation temperature (default 2)")
    p.add_argument("--hard-weight", type=float, default=0.5, help="weight of the next-character CE term")
    p.add_argument("--topk", type=int, default=0, help="give the teacher as its top-k log-probabilities")
    p.add_argument("--chars", type=int, default=400_000, help="corpus size in characters")
    p.add_argument("--backend", default="auto", choices=fastkd.BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = device_from(args.device)
    text, vocab = corpus(args.chars)
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * ids.numel())
    train_ids, test_ids = ids[:split], ids[split:]
    print(f"corpus: {ids.numel():,} characters, vocabulary {len(vocab)}; device {device}, "
          f"backend {args.backend}")
    results = {}
    with fastkd.use_backend(args.backend):
        torch.manual_seed(args.seed)
        teacher = CausalLM(len(vocab), 128, 3, context=args.context).to(device)
        start = time.monotonic()
        teacher_args = argparse.Namespace(**{**vars(args), "steps": args.teacher_steps or 2 * args.steps})
        train(teacher, train_ids, teacher_args, device, args.seed + 1)
        teacher.eval()
        results["teacher"] = evaluate(teacher, test_ids, args.context, device)
        torch.manual_seed(args.seed + 2)
        init = CausalLM(len(vocab), 64, 2, context=args.context).state_dict()
        for name, kd in (("student, cross-entropy", None),
                         ("student, FusedLinearSoftTarget",
                          fastkd.FusedLinearSoftTarget(args.T, hard_weight=args.hard_weight))):
            student = CausalLM(len(vocab), 64, 2, context=args.context).to(device)
            student.load_state_dict(init)
            train(student, train_ids, args, device, args.seed + 3, teacher=teacher, kd=kd)
            results[name] = evaluate(student, test_ids, args.context, device)
    for name, value in results.items():
        print(f"{name:32s} held-out cross-entropy {value:.3f} nats/char")
    print(f"({time.monotonic() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
