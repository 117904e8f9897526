"""Attention and float8 micro-benchmarks at FLUX.1-dev shapes, with errors against a float64 reference.

1. The FA3 custom op (bf16; fp8 e4m3 casts + op, unscaled as flux-fast did; the raw fp8 kernel) and cuDNN SDPA on
   (1, 4608, 24, 128): relative error vs float64 attention on fresh random inputs, TFLOP/s (do_bench
   medians). Also checks that the op compiles (fullgraph) to the same output.
2. torchao float8 granularity: a FLUX MLP (3072 -> 12288 -> 3072, tanh-GELU) on 4608 tokens, compiled,
   bf16 vs float8 per-tensor vs per-row scaling: median ms and relative error vs float64.

    python scripts/bench_attention.py --out runs/attention
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.attention import (FA3_SOURCE, _FA3_FUNC, fa3_attention, fa3_fp8_attention,  # noqa: E402
                             fa3_unavailable_reason)
from utils.benchmark_utils import command_line, environment_record  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def attention_rows(b=1, s=4608, h=24, d=128) -> list[dict]:
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    flops = 4 * b * h * s * s * d
    rows = []

    def add(name, fn):
        out = fn()
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows.append({"kernel": name, "rel_err_vs_fp64": rel_err(out, ref), "ms": ms, "tflops": flops / ms / 1e9})

    def sdpa(backend):
        from torch.nn.attention import sdpa_kernel

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return run

    from torch.nn.attention import SDPBackend

    add("sdpa_cudnn_bf16", sdpa(SDPBackend.CUDNN_ATTENTION))
    add("sdpa_flash2_bf16", sdpa(SDPBackend.FLASH_ATTENTION))
    if fa3_unavailable_reason() is None:
        add("fa3_op_bf16", lambda: fa3_attention(q, k, v))
        add("fa3_fp8_attention (casts + op)", lambda: fa3_fp8_attention(q, k, v))
        q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))

        def unscaled():
            out = _FA3_FUNC(q8, k8, v8)
            return (out[0] if isinstance(out, tuple) else out)
        add("fa3_fp8_unscaled_cast (flux-fast)", unscaled)
        compiled = torch.compile(lambda a, b_, c: fa3_attention(a, b_, c), fullgraph=True)
        rows.append({"kernel": "fa3_op_bf16 compiled == eager",
                     "max_abs_diff": (compiled(q, k, v) - fa3_attention(q, k, v)).abs().max().item()})
    else:
        rows.append({"kernel": "fa3", "unavailable": fa3_unavailable_reason()})
    return rows


def quant_rows(tokens=4608, dim=3072, hidden=12288) -> list[dict]:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(hidden, dim)).cuda().to(torch.bfloat16)
    x = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16)
    ref = copy.deepcopy(mlp).double()(x.double())
    flops = 2 * 2 * tokens * dim * hidden
    rows = []
    for name, gran in (("bf16", None), ("float8_per_tensor", PerTensor()), ("float8_per_row", PerRow())):
        m = copy.deepcopy(mlp)
        if gran is not None:
            quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=gran))
        torch._dynamo.reset()
        fn = torch.compile(m, fullgraph=True)
        with torch.no_grad():
            out = fn(x)
            ms = do_bench(lambda: fn(x), warmup=25, rep=200, return_mode="median")
        rows.append({"mlp": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_fp64": rel_err(out, ref)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/attention")
    opts = parser.parse_args()
    torch.manual_seed(0)
    record = {"kind": "attention_and_float8_microbench", "command": "python scripts/" + command_line(),
              "environment": environment_record("cuda"), "fa3_source": FA3_SOURCE,
              "attention_shape_bshd": [1, 4608, 24, 128], "mlp_shape": [4608, 3072, 12288],
              "timing": "triton.testing.do_bench median (warmup 25 ms, rep 200 ms); fresh torch.randn inputs"}
    with torch.no_grad():
        record["attention"] = attention_rows()
    for r in record["attention"]:
        print("[attn]", r, flush=True)
    record["float8_mlp"] = quant_rows()
    for r in record["float8_mlp"]:
        print("[fp8 ]", r, flush=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_fp8_microbench.json").write_text(json.dumps(record, indent=2, default=str))
    env = record["environment"]
    md = [f"# Attention and float8 micro-benchmarks ({env['gpu']}, torch {env['torch']}, FA3 {env['fa3']}, "
          f"torchao {env['torchao']})", "", f"Command: `{record['command']}`. {record['timing']}.", "",
          "| attention (1, 4608, 24, 128) | rel. err vs fp64 | ms | TFLOP/s |", "|---|---|---|---|"]
    md += [f"| {r['kernel']} | {r['rel_err_vs_fp64']:.2e} | {r['ms']:.3f} | {r['tflops']:.0f} |"
           for r in record["attention"] if "ms" in r]
    md += ["", "| FLUX MLP 4608x3072->12288->3072, compiled | rel. err vs fp64 | ms | TFLOP/s |", "|---|---|---|---|"]
    md += [f"| {r['mlp']} | {r['rel_err_vs_fp64']:.2e} | {r['ms']:.3f} | {r['tflops']:.0f} |"
           for r in record["float8_mlp"]]
    (out / "attention_fp8_microbench.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
