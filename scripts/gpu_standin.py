#!/usr/bin/env python3
"""What a layer-skipped draft pass and a CLaSp DP run cost on a GPU, without vLLM.

A plain-torch decoder of Llama-3-8B's shape (32 layers, hidden 4096, 32/8 heads of 128, SwiGLU
14336, vocab 128256) with random weights and a static KV cache of --context positions per
request, decoding one token per request the way a vLLM decode step does. It times, in units of
one plain step of the same batch replayed from one CUDA graph:

- the plain step eagerly;
- a draft pass skipping M layers three ways: one CUDA graph for the whole pass, the project's
  per-layer replay (`vllm_clasp.core.layer_graphs.LayerGraphs`: one graph per decoder layer,
  the kept layers replayed in order), and eagerly;
- one DP run (`vllm_clasp.core.optimizer.search_skip_sets`, embeddings only, trajectory rows
  riding along) with its layer calls eager and from per-layer graphs.

Before timing it checks that per-layer replay gives the whole-graph pass's tokens and that
every graphed layer matches its eager self (`LayerGraphs.check`).

    python scripts/gpu_standin.py                 # needs CUDA; ~3 min on one H100/H200
    python scripts/gpu_standin.py --tiny --device cpu   # a small shape, eager only (a smoke test)

Prints a table and, with --out, writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_clasp.core.layer_graphs import LayerGraphs  # noqa: E402
from vllm_clasp.core.optimizer import plan_layer_calls, search_skip_sets  # noqa: E402


@dataclass
class Shape:
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    mlp: int = 14336
    vocab: int = 128256
    context: int = 1024


TINY = Shape(layers=6, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=512, context=32)


class Decoder:
    """Random-weight decoder; KV caches [L][B, G, S, D] at fixed addresses."""

    def __init__(self, shape: Shape, max_batch: int, device, dtype, lookahead: int = 8):
        self.s, self.device, self.dtype = shape, device, dtype
        g = torch.Generator(device="cpu").manual_seed(0)
        d, H, G, D = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim

        def w(*size):
            return (torch.randn(*size, generator=g) * 0.02).to(device, dtype)

        self.embed = w(shape.vocab, d)
        self.head = w(shape.vocab, d)
        self.norm = torch.ones(d, device=device, dtype=dtype)
        self.w = [dict(qkv=w(d, (H + 2 * G) * D), o=w(H * D, d), gate_up=w(d, 2 * shape.mlp),
                       down=w(shape.mlp, d), n1=torch.ones(d, device=device, dtype=dtype),
                       n2=torch.ones(d, device=device, dtype=dtype))
                  for _ in range(shape.layers)]
        S = shape.context + lookahead
        self.k = [w(max_batch, G, S, D) * 50 for _ in range(shape.layers)]  # [B, G, S, D]
        self.v = [w(max_batch, G, S, D) * 50 for _ in range(shape.layers)]
        self.slots = torch.arange(S, device=device)  # [S]
        self.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
        # Static per-row query positions: drafts write their K/V there; the DP reads only.
        self.draft_pos = torch.full((max_batch,), shape.context, device=device, dtype=torch.long)
        self.dp_pos = torch.full((max_batch,), shape.context - 1, device=device, dtype=torch.long)

    @staticmethod
    def rms(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * weight

    def rope(self, x, pos):  # x [B, C, h, D], pos [B]
        freqs = pos.float()[:, None] * self.inv_freq  # [B, D/2]
        cos, sin = freqs.cos()[:, None, None], freqs.sin()[:, None, None]  # [B, 1, 1, D/2]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    def layer(self, index: int, x: torch.Tensor, pos: torch.Tensor, write: bool):
        """x [B, C, d] -> [B, C, d]; every query of row b sits at pos[b]. write: store the
        (single) query's K/V at its position first (a draft token)."""
        s, w = self.s, self.w[index]
        B, C, _ = x.shape
        H, G, D = s.heads, s.kv_heads, s.head_dim
        pos = pos[:B]
        qkv = self.rms(x, w["n1"]) @ w["qkv"]  # [B, C, (H+2G)D]
        q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
        q = self.rope(q.view(B, C, H, D), pos)
        k = self.rope(k.view(B, C, G, D), pos)
        keys, values = self.k[index][:B], self.v[index][:B]  # [B, G, S, D]
        if write:
            rows = torch.arange(B, device=x.device)
            keys[rows, :, pos] = k[:, 0]
            values[rows, :, pos] = v.view(B, C, G, D)[:, 0]
        mask = (self.slots[None, :] <= pos[:, None])[:, None, None]  # [B, 1, 1, S]
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                              enable_gqa=True)  # [B, H, C, D]
        x = x + attn.transpose(1, 2).reshape(B, C, H * D) @ w["o"]
        gate, up = (self.rms(x, w["n2"]) @ w["gate_up"]).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ w["down"]

    def logits_argmax(self, x):  # [B, 1, d] -> [B]
        return (self.rms(x[:, 0], self.norm) @ self.head.T).argmax(-1)

    def step(self, tokens, kept):  # tokens [B] -> next tokens [B]; kept: layers to run
        x = self.embed[tokens][:, None]  # [B, 1, d]
        for layer in kept:
            x = self.layer(layer, x, self.draft_pos, write=True)
        return self.logits_argmax(x)


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls (CUDA events on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def whole_graph(fn, device):
    """fn captured as one CUDA graph; returns (replay callable, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def skip_set(L: int, M: int, seed: int) -> list[int]:
    """Kept layers of a random M-layer skip set that never skips the first or last layer."""
    g = torch.Generator().manual_seed(seed)
    skipped = set((torch.randperm(L - 2, generator=g)[:M] + 1).tolist())
    return [i for i in range(L) if i not in skipped]


def measure(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else Shape(context=args.context)
    batches = [int(b) for b in args.batches.split(",")]
    skips = [int(m) for m in args.skips.split(",")]
    model = Decoder(shape, max(batches), device, dtype)
    L = shape.layers
    draft = LayerGraphs(lambda i, x: model.layer(i, x, model.draft_pos, write=True), L)
    dp = LayerGraphs(lambda i, x: model.layer(i, x, model.dp_pos, write=False), L)
    result = {"shape": asdict(shape), "device": torch.cuda.get_device_name() if cuda else
              platform.processor() or platform.machine(), "torch": torch.__version__,
              "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"), "batches": {}}
    for B in batches:
        tokens = torch.randint(shape.vocab, (B,), device=device)
        plain_eager = timed(lambda: model.step(tokens, range(L)), device, args.repeats)
        row = {"plain_eager": plain_eager}
        if cuda:
            replay, _ = whole_graph(lambda: model.step(tokens, range(L)), device)
            plain = timed(replay, device, args.repeats)
        else:
            plain = plain_eager
        row["plain_ms"] = plain
        row["plain_eager"] = plain_eager / plain
        x0 = model.embed[tokens][:, None].clone()  # [B, 1, d]
        draft.capture(x0)
        row["layer_check_max_diff"] = draft.check(x0)
        for M in skips:
            kept = skip_set(L, M, seed=M)
            eager = timed(lambda: model.step(tokens, kept), device, args.repeats)
            entry = {"eager": eager / plain}

            def per_layer():
                x = draft.replay(kept, model.embed[tokens][:, None])
                return model.logits_argmax(x)

            entry["per_layer"] = timed(per_layer, device, args.repeats) / plain
            if cuda:
                replay, out = whole_graph(lambda: model.step(tokens, kept), device)
                entry["whole_graph"] = timed(replay, device, args.repeats) / plain
                replay()
                same = bool(torch.equal(out, per_layer()))
                entry["per_layer_same_tokens"] = same
                entry["per_layer_vs_whole"] = entry["per_layer"] / entry["whole_graph"]
            row[f"draft_M{M}"] = entry
        if B <= args.max_dp_batch:
            row["dp"] = measure_dp(model, dp, B, args, plain, cuda)
        result["batches"][B] = row
    result["graphs"] = draft.reason or "per-layer CUDA graphs"
    return result


def measure_dp(model: Decoder, graphs: LayerGraphs, B: int, args, plain: float, cuda: bool):
    """One DP run (max skip J, min J/2) with eager layers and with per-layer graphs."""
    shape, device = model.s, model.device
    J = args.dp_max_skip
    never = [0, shape.layers - 1]
    plan = plan_layer_calls(shape.layers, J, never, J // 2)
    tokens = torch.randint(shape.vocab, (B,), device=device)
    emb = model.embed[tokens]  # [B, d]
    if cuda:  # one graph set per candidate count the plan asks for (C = 1 + E rows per request)
        for C in sorted({1 + len(e) for e, _ in plan}):
            graphs.capture(torch.zeros(B, C, shape.hidden, device=device, dtype=model.dtype))

    def run_layer(use_graphs: bool):
        def run(layer: int, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            E = (len(states) - B) // B  # trajectory rows first, then B*E request-major
            x = torch.cat([states[:B, None], states[B:].view(B, E, states.shape[-1])], dim=1)  # [B, 1+E, d]
            if use_graphs:
                x = graphs.replay([layer], x)
            else:
                x = model.layer(layer, x, model.dp_pos, write=False)
            return torch.cat([x[:, 0], x[:, 1:].reshape(B * E, x.shape[-1])])
        return run

    def dp(use_graphs):
        return search_skip_sets(emb[None], run_layer(use_graphs), max_skip=J, min_skip=J // 2,
                                never_skip=never, num_layers=shape.layers)

    eager = timed(lambda: dp(False), device, max(3, args.repeats // 4))
    out = {"max_skip": J, "eager": eager / plain}
    if cuda and graphs.graphed:
        out["graphed"] = timed(lambda: dp(True), device, max(3, args.repeats // 4)) / plain
        a, b = dp(False), dp(True)
        out["same_skip_sets"] = bool(torch.equal(a.skip_mask(J), b.skip_mask(J)))
    return out


def report(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']}, {result['dtype']}, "
             f"{result['shape']['layers']} layers x hidden {result['shape']['hidden']}, "
             f"context {result['shape']['context']}; draft layers: {result['graphs']}",
             "ratios in plain steps of the same batch (one CUDA graph per plain step)"]
    for B, row in result["batches"].items():
        lines.append(f"B={B}: plain step {row['plain_ms']:.2f} ms, eager {row['plain_eager']:.2f}"
                     f"; graphed layers vs eager max |diff| {row['layer_check_max_diff']:.3g}")
        for key, entry in row.items():
            if key.startswith("draft_M"):
                parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in entry.items()]
                lines.append(f"  draft pass skipping {key[7:]}: " + ", ".join(parts))
        if "dp" in row:
            parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in row["dp"].items()]
            lines.append("  one DP run: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 6-layer toy shape")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--skips", default="12,20", help="layers skipped per draft pass")
    parser.add_argument("--dp-max-skip", type=int, default=16)
    parser.add_argument("--max-dp-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.tiny:
        args.skips = ",".join(str(min(int(m), TINY.layers - 2)) for m in args.skips.split(","))
        args.dp_max_skip = min(args.dp_max_skip, TINY.layers - 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu (eager only)")
    with torch.inference_mode():
        result = measure(args)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
