"""The attention variants of issue 15 against plain MLA at the same seed and budget.

Each variant trains train-toy's default MQAR (held-out accuracy) and the byte-level text task
(held-out bits per character) with :func:`topkattn.training.train.train` (top-k attention, k=8,
the default width d=64, 2 layers, 4 heads, latent 32), then times one decode step of the MQAR
model with a 64k-token cache (the caches filled with random latent rows; exact top-k selection).
Columns: held-out MQAR accuracy, text bits/char, KV-cache bytes per token (the model's, all
layers; plain MHA of the same heads for reference), parameters, training tokens/s, decode step.

    python benchmarks/bench_variants.py                          # every variant, the default budget
    python benchmarks/bench_variants.py --variants mla diffqkv-8-16-q32 --mqar-steps 600 --text-steps 500
    python benchmarks/bench_variants.py --quick --variants mla mha mha-ternary   # a smoke run (JSON only with --json)

Report ratios measured in one run (the machine is shared and noisy).
"""
import argparse
import json
import os
import time

import numpy as np

VARIANTS = {  # name -> TrainConfig fields (train-toy flags)
    "mla": {},
    "kv-experts-4-2": {"kv_experts": 4, "kv_experts_active": 2},
    "diffqkv-8-16-q32": {"k_rank": 8, "v_rank": 16, "q_head_dim": 32},
    "ternary": {"ternary": True},
    "ternary-act8": {"ternary": True, "act_bits": 8},
    "mha": {"attention_layer": "mha"},  # plain multi-head attention (head dim d / heads), and its variants
    "mha-kv-experts-4-2": {"attention_layer": "mha", "kv_experts": 4, "kv_experts_active": 2},
    "mha-ternary": {"attention_layer": "mha", "ternary": True},
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "variants.json")


def train_variant(fields, task, steps, seed):
    from topkattn.training.train import TrainConfig, train
    cfg = TrainConfig(task=task, steps=steps, seed=seed, warmup_steps=max(1, steps // 20),
                      seq_len=64 if task == "mqar" else 128, **fields)
    return train(cfg, threads=1)


def decode_step_seconds(model, context, repeats):
    """Median seconds of one model.step with ``context`` cached tokens per layer (random rows)."""
    rng = np.random.default_rng(0)
    with model.decoding():
        cache = model.init_cache(1)
        for c in cache:
            if hasattr(c, "buf"):  # MLACache: latent rows (and value rows with separate ranks)
                keys = rng.standard_normal((1, context, c.buf.data.shape[-1])).astype(np.float32)
                vals = None
                if getattr(c, "vbuf", None) is not None:
                    vals = rng.standard_normal((1, context, c.vbuf.data.shape[-1])).astype(np.float32)
                c.append(keys, vals)
            else:
                c.kbuf.append(rng.standard_normal((1,) + c.kbuf.data.shape[1:2] + (context,)
                                                  + c.kbuf.data.shape[3:]).astype(np.float32))
                c.vbuf.append(rng.standard_normal((1,) + c.vbuf.data.shape[1:2] + (context,)
                                                  + c.vbuf.data.shape[3:]).astype(np.float32))
        tok = np.zeros((1, 1), dtype=np.int64)
        model.step(tok, cache)  # warm-up (kernels compiled, weights packed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.step(tok, cache)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def mha_bytes_per_token(model):
    """Bytes per token of plain MHA with the model's heads and head dims (full K and V per head)."""
    c = model.cfg
    if c.attention == "mha":
        return model.kv_bytes_per_token()
    nope = c.qk_nope_dim if c.q_head_dim is None else c.q_head_dim - c.qk_rope_dim
    return c.n_layers * c.n_heads * (nope + c.qk_rope_dim + c.v_head_dim) * np.dtype(c.dtype).itemsize


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--mqar-steps", type=int, default=600)
    ap.add_argument("--text-steps", type=int, default=150)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help=f"write the rows here (default {RESULTS}; none with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 60 MQAR and 20 text steps, a 4k context, 2 repeats, JSON only with --json")
    args = ap.parse_args()
    if args.quick:
        args.mqar_steps, args.text_steps, args.context, args.repeats = 60, 20, 4096, 2
    elif args.json is None:
        args.json = RESULTS
    rows = []
    for name in args.variants:
        fields = VARIANTS[name]
        mq = train_variant(fields, "mqar", args.mqar_steps, args.seed)
        text = train_variant(fields, "text", args.text_steps, args.seed) if args.text_steps else None
        model = mq.model
        row = {"variant": name, "flags": fields, "mqar_steps": args.mqar_steps, "text_steps": args.text_steps,
               "mqar_accuracy": mq.metrics["accuracy"],
               "text_bits_per_char": None if text is None else text.metrics["bits_per_char"],
               "kv_bytes_per_token": model.kv_bytes_per_token(), "mha_kv_bytes_per_token": mha_bytes_per_token(model),
               "n_params": model.n_params(), "tokens_per_s": mq.metrics["tokens_per_s"],
               "decode_step_s": decode_step_seconds(model, args.context, args.repeats), "context": args.context}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    head = f"{'variant':20s} {'MQAR acc':>9s} {'text bpc':>9s} {'KV B/tok':>9s} {'MHA B/tok':>9s} " \
           f"{'params':>8s} {'tok/s':>8s} {'step@' + str(args.context // 1024) + 'k ms':>12s}"
    print(head)
    for r in rows:
        bpc = "-" if r["text_bits_per_char"] is None else f"{r['text_bits_per_char']:.3f}"
        print(f"{r['variant']:20s} {100 * r['mqar_accuracy']:8.2f}% {bpc:>9s} {r['kv_bytes_per_token']:9d} "
              f"{r['mha_kv_bytes_per_token']:9d} {r['n_params']:8d} {r['tokens_per_s']:8.0f} "
              f"{1e3 * r['decode_step_s']:12.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
