"""Which ingredient of the float8 FLUX block makes `aoti_load_package` crash on the GPU?

The regional export_aoti builds of the float8 stack (QKV fusion, FA3 fp8 op, torchao float8, sigmoid GELU) built,
then the process died with a segmentation fault inside `torch._inductor.aoti_load_package` (torch 2.11, H200,
results/h200/stages_cudagraphs_2026-12-01.log), while the same code loads and matches eager on CPU. Each case here
builds a small package with one ingredient and loads it, printing before every step, so a crash names its step.
Run each case in its own process (a segfault ends only that case):

    for c in linear linear_in_so fa3_op fa3_op_fp8 float8 float8_in_so; do
        python3 -X faulthandler scripts/h100_aoti_probe.py --case $c; done

`--loader runner` skips the package: AOTInductor's plain .so (torch._inductor.aot_compile) loaded by the model
container runner itself. If the crash is in the package loader, this path runs, and export_aoti could take it.

For the native stack of the crash, build outside the debugger (the build spawns compilers for minutes under it) and
load under it:

    python3 scripts/h100_aoti_probe.py --case linear_in_so --build_only /tmp/p.pt2
    cuda-gdb -batch -ex run -ex bt --args python3 scripts/h100_aoti_probe.py --case linear_in_so --load_only /tmp/p.pt2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import compile_utils  # noqa: E402
from utils.attention import fa3_attention, fa3_fp8_attention  # noqa: E402

CASES = ("linear", "linear_in_so", "fa3_op", "fa3_op_fp8", "float8", "float8_in_so")


class Attend(torch.nn.Module):
    """A projection into q/k/v (FLUX's head size) and the FA3 custom op, bf16 or fp8 inputs."""

    def __init__(self, fp8: bool):
        super().__init__()
        self.qkv, self.fp8 = torch.nn.Linear(256, 3 * 256), fp8

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 128)).unbind(2)
        return (fa3_fp8_attention if self.fp8 else fa3_attention)(q, k, v).flatten(2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=CASES, required=True)
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--build_only", metavar="PATH", help="build the package at PATH and stop (with --loader "
                                                           "runner: PATH gets the built .so's path)")
    step.add_argument("--load_only", metavar="PATH", help="load and run the package built at PATH by --build_only")
    parser.add_argument("--device", default="cuda", help="cpu checks the script itself (the crash is on CUDA)")
    parser.add_argument("--loader", choices=("package", "runner"), default="package",
                        help="package: aoti_compile_and_package + aoti_load_package (what export_aoti uses); runner: "
                             "aot_compile's .so (weights in it) + AOTIModelContainerRunner")
    opts = parser.parse_args()
    case = opts.case

    def say(what):
        print(f"[probe] {case}: {what}", flush=True)

    torch.manual_seed(0)
    model = Attend(fp8=case == "fa3_op_fp8") if case.startswith("fa3") else \
        torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(1024, 256))
    model = model.to(opts.device, torch.bfloat16)
    x = torch.randn(1, 512, 256, device=opts.device, dtype=torch.bfloat16)
    if case.startswith("float8"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    with torch.no_grad():
        ref = model(x).float()
        path = Path(opts.load_only or opts.build_only or Path(tempfile.mkdtemp()) / f"{case}.pt2")
        if not opts.load_only:  # the same seed builds the same weights for a later --load_only
            say(f"C++ compiler {compile_utils.cxx_compiler()} ($CXX; /opt/gcc/bin/g++ built .so files that crashed "
                f"the loader on the lent H200)")
            t0 = time.perf_counter()
            exported = torch.export.export(model, (x,), strict=False)
            say(f"exported in {time.perf_counter() - t0:.0f} s")
            if opts.loader == "runner":  # a .so with the weights in it, no package around it
                built = torch._inductor.aot_compile(exported.module(), (x,),
                                                    options={"aot_inductor.package_constants_in_so": True})
                if opts.build_only:  # the .so stays where inductor built it (its kernels may lie beside it)
                    Path(opts.build_only).write_text(str(built))
                path = Path(built)
            else:
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(path),
                    inductor_configs={"aot_inductor.package_constants_in_so": case.endswith("_in_so")})
            say(f"built {path} in {time.perf_counter() - t0:.0f} s")
            if opts.build_only:
                return
        if opts.loader == "runner" and opts.load_only:  # --build_only wrote the .so's path there
            path = Path(Path(opts.load_only).read_text().strip())
        say(f"loading {path} ({opts.loader})")
        if opts.loader == "runner":
            runner = (torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, opts.device) if opts.device != "cpu"
                      else torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1))
            say("loaded; running")
            out = runner.run([x])[0].float()
            rel = ((out - ref).norm() / ref.norm()).item()
            say(f"ran: relative difference to eager {rel:.2e} -> {'PASS' if rel < 2e-2 else 'FAIL'}")
            return
        loaded = torch._inductor.aoti_load_package(str(path))
        say(f"loaded; constants {loaded.get_constant_fqns()}")
        weights = {k: v for k, v in compile_utils.export_constants(model).items()
                   if k in set(loaded.get_constant_fqns())}
        loaded.load_constants(weights, check_full_update=True, user_managed=True)
        say("constants loaded (user-managed); running")
        out = loaded(x)
        out = (out[0] if isinstance(out, (list, tuple)) else out).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    say(f"ran: relative difference to eager {rel:.2e} -> {'PASS' if rel < 2e-2 else 'FAIL'}")


if __name__ == "__main__":
    main()
