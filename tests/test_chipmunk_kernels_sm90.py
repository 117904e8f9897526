"""Chipmunk's Triton kernels (utils/chipmunk/kernels.py) compiled ahead of time for the H100 (sm_90) on a CPU-only
machine: every autotune config, at FLUX.1 shapes, must get through ptxas without spilling, fit in the H100's shared
memory, use wgmma, and software-pipeline its loop over gathered rows (and the column sums' loop over query tiles).
The interpreted tests (tests/interpreted/test_kernels.py) check what the kernels compute; this checks that they
build for the GPU (the interpreter never runs the compiler: layouts, wgmma, shared memory, registers)."""

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch that requirements.txt installs")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1 turns the kernels into interpreted functions, which cannot be compiled",
                allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from utils.chipmunk import kernels as ct  # noqa: E402
from utils.chipmunk import reference  # noqa: E402
from utils.chipmunk.config import AttnConfig, MlpConfig, rounded_count  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 227 * 1024  # opt-in dynamic shared memory per block on sm_90
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# FLUX.1 at 1024x1024: 4096 image + 512 text tokens, 24 heads of 128, MLP 3072 -> 12288; the launch code's rules
# (utils/chipmunk/config.py defaults, utils/chipmunk/kernels.py tiles) give the counts and tiles.
B, L, HEADS, HEAD_DIM, DM, HIDDEN = 1, 4608, 24, 128, 3072, 12288
ATTN, MLP = AttnConfig(), MlpConfig()
GROUP, MLP_BLOCK = ATTN.mbm, MLP.bm
NK_ATTN = rounded_count(ATTN.top_keys, L, ATTN.counts_multiple_of)
NK_MLP = rounded_count(MLP.top_keys + MLP.random_keys, HIDDEN, MLP.counts_multiple_of)
G, NB = -(-L // GROUP), -(-L // MLP_BLOCK)
ATTN_BLOCK_M, MLP_BLOCK_M = ct._row_tile(GROUP, 64), ct._row_tile(MLP_BLOCK, 128)
ELEMENTWISE = {"activation_delta", "dense_mlp_epilogue", "top_neurons", "top_keys", "top_and_random_neurons",  # no tl.dot: no wgmma
               "top_keys_16_warps", "top_and_random_neurons_seed_in_tensor", "top_and_random_neurons_change",
               "top_neurons_radix",
               "top_and_random_neurons_radix"}
GATHERED = {"sparse_attention", "sparse_attention_cached", "sparse_attention_dense_step",
            "sparse_fc1", "sparse_fc2", "sparse_fc1_uneven",
            "sparse_fc2_uneven", "sparse_fc1_tma", "sparse_fc2_tma", "sparse_fc1_fp8", "sparse_fc1_tma_fp8",
            "sparse_fc2_fp8"}  # loops over gathered rows
TMA = {"sparse_fc1_tma", "sparse_fc2_tma", "sparse_fc1_tma_fp8"}  # dense operand through a TMA descriptor: its loads must be TMA copies
PIPELINED = GATHERED | {"column_sum"}  # column sums: one flat loop over a run of query groups' row tiles


def meta(*shape, dtype=torch.bfloat16):
    """Stands in for a launch argument: the binder only reads dtype and alignment (meta data_ptr is 0)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def kernel_args():
    """name -> (kernel, fixed launch configs or None for the autotuner's list, arguments) as the launch code passes."""
    q, x, delta = meta(B, L, HEADS, HEAD_DIM), meta(B, L, DM), meta(B, L, NK_MLP)
    act = meta(B, HIDDEN, L).transpose(1, 2)  # neuron-major, as reference.neuron_major stores it
    out, lse = meta(B, L, DM, dtype=torch.float32), meta(B, HEADS, L, dtype=torch.float32)
    s = q.stride()
    qk = dict(Q=q, K=q, sqb=s[0], sql=s[1], sqh=s[2], skb=s[0], skl=s[1], skh=s[2], H=HEADS, D=HEAD_DIM,
              scale_log2=0.1)
    attn = dict(qk, V=q, IDX=meta(B, HEADS, G, NK_ATTN, dtype=torch.int32), OC=q, O=q, svb=s[0], svl=s[1],
                svh=s[2], sob=s[0], sol=s[1], soh=s[2], L=L, G=G, NK=NK_ATTN, GROUP=GROUP, BLOCK_M=ATTN_BLOCK_M,
                EVEN_N=NK_ATTN % 128 == 0)
    mlp_index = meta(B, NB, NK_MLP, dtype=torch.int32)
    seed_mix, golden, mix1, mix2 = reference.HASH_CONSTANTS
    top_and_random = dict(X=meta(NB, HIDDEN, dtype=torch.float32), REF=meta(NB, HIDDEN, dtype=torch.float32),
                          OUT=mlp_index, SEED=meta(1, dtype=torch.int64),
                          offset=reference.hash_offset(1_000_007), seed_mix=seed_mix, golden=golden, mix1=mix1,
                          mix2=mix2, N=HIDDEN, TOP=rounded_count(MLP.top_keys, HIDDEN, 1), TOTAL=NK_MLP,
                          sx=HIDDEN, sr=HIDDEN, so=NK_MLP, SEED_IN_TENSOR=False, HAS_REF=False, BLOCK=16384,
                          SEARCH="bitwise")
    fc1 = dict(X=x, W1=meta(HIDDEN, DM), B1=meta(HIDDEN), IDX=mlp_index, NEW=delta,
               PRESUM=meta(B, NB, NK_MLP, dtype=torch.float32), XS=meta(B, L, dtype=torch.float32),
               WS=meta(HIDDEN, dtype=torch.float32), FP8=False, sxb=x.stride(0), sxl=x.stride(1),
               snb=delta.stride(0), snl=delta.stride(1), L=L, DM=DM, NK=NK_MLP, NB=NB, TOKENS_PER_BLOCK=MLP_BLOCK,
               BLOCK_M=MLP_BLOCK_M, EVEN_D=DM % ct._largest(ct._sparse_fc1_kernel, "BLOCK_D") == 0)
    fc2 = dict(DELTA=delta, W2T=meta(HIDDEN, DM), IDX=mlp_index, OUT=out, LOW=meta(B, L, DM),
               DS=meta(B, L, dtype=torch.float32), WS=meta(DM, dtype=torch.float32), FP8=False, sdb=delta.stride(0),
               sdl=delta.stride(1), sob=out.stride(0), sol=out.stride(1), slb=L * DM, sll=DM, L=L, NK=NK_MLP, NOUT=DM,
               NB=NB, TOKENS_PER_BLOCK=MLP_BLOCK, WRITE_LOW=True, BLOCK_M=MLP_BLOCK_M,
               EVEN_K=NK_MLP % ct._largest(ct._sparse_fc2_kernel, "BLOCK_K") == 0,
               EVEN_N=DM % ct._largest(ct._sparse_fc2_kernel, "BLOCK_N") == 0)
    assert fc1["EVEN_D"] and fc2["EVEN_K"] and fc2["EVEN_N"], "FLUX's shapes take the loops without masks"
    # The TMA kernels (sparse_mlp(tma=True), the layers' path on Hopper): descriptors over (B * L, width) views,
    # boxes set by each config's pre-hook.
    fc1_tma = dict({k: v for k, v in fc1.items() if k not in ("X", "sxb", "sxl")},
                   X_DESC=TensorDescriptor(x, [B * L, DM], [DM, 1], [MLP_BLOCK_M, 16]))
    fc2_tma = dict({k: v for k, v in fc2.items() if k not in ("DELTA", "sdb", "sdl")},
                   DELTA_DESC=TensorDescriptor(delta, [B * L, NK_MLP], [NK_MLP, 1], [MLP_BLOCK_M, 16]))
    # mlp.is_fp8: X and the gathered W1 rows in float8 e4m3 (wgmma's float8 operands), their scales in the epilogue.
    x8 = meta(B, L, DM, dtype=torch.float8_e4m3fn)
    fc1_fp8 = dict(fc1, X=x8, W1=meta(HIDDEN, DM, dtype=torch.float8_e4m3fn), FP8=True,
                   EVEN_D=DM % ct._largest(ct._sparse_fc1_fp8_kernel, "BLOCK_D") == 0)
    fc1_tma_fp8 = dict(fc1_tma, W1=fc1_fp8["W1"], FP8=True,
                       X_DESC=TensorDescriptor(x8, [B * L, DM], [DM, 1], [MLP_BLOCK_M, 16]))
    # ... and fc2 (its pointer kernel): the deltas quantized per token, W2^T's gathered rows in float8.
    delta8 = meta(B, L, NK_MLP, dtype=torch.float8_e4m3fn)
    fc2_fp8 = dict(fc2, DELTA=delta8, W2T=meta(HIDDEN, DM, dtype=torch.float8_e4m3fn), FP8=True,
                   EVEN_K=NK_MLP % ct._largest(ct._sparse_fc2_fp8_kernel, "BLOCK_K") == 0)
    top_neurons = dict(X=meta(NB, HIDDEN, dtype=torch.float32), OUT=mlp_index, N=HIDDEN, K=NK_MLP, sx=HIDDEN,
                       so=NK_MLP, BLOCK=16384, SEARCH="bitwise")
    return {
        "row_lse": (ct._row_lse_kernel, [dict(BLOCK_N=64, num_warps=4, num_stages=3)],
                    dict(qk, LSE=lse, L=L, LK=L, BLOCK_M=ATTN_BLOCK_M)),
        "column_sum": (ct._column_sum_kernel, None,
                       dict(qk, LSE=lse, OUT=meta(B, HEADS, G, L, dtype=torch.float32), L=L, LK=L, G=G, GROUP=GROUP,
                            BLOCK_M=ATTN_BLOCK_M)),
        "sparse_attention": (ct._sparse_attention_kernel, None, dict(attn, HAS_CACHE=False, SUBTRACT=False)),
        "sparse_attention_cached": (ct._sparse_attention_kernel, None, dict(attn, HAS_CACHE=True, SUBTRACT=False)),
        "sparse_attention_dense_step": (ct._sparse_attention_kernel, None, dict(attn, HAS_CACHE=True, SUBTRACT=True)),
        "sparse_fc1": (ct._sparse_fc1_kernel, None, fc1),
        # Shapes that leave partial tiles take the masked loads (other neuron counts, model widths).
        "sparse_fc1_uneven": (ct._sparse_fc1_kernel, None, dict(fc1, EVEN_D=False)),
        "activation_delta": (ct._activation_delta_kernel, [dict(BLOCK_K=64, num_warps=4, num_stages=3)],
                             dict(NEW=delta, IDX=mlp_index, ACT=act, DELTA=delta,
                                  PRESUM=meta(B, NB, NK_MLP, dtype=torch.float32),
                                  PREMEAN=meta(B, NB, HIDDEN, dtype=torch.float32), snb=delta.stride(0),
                                  snl=delta.stride(1), sab=act.stride(0), sal=act.stride(1), sak=act.stride(2),
                                  sdb=delta.stride(0), sdl=delta.stride(1), spb=NB * HIDDEN, spn=HIDDEN, L=L,
                                  NK=NK_MLP, NB=NB, TOKENS_PER_BLOCK=MLP_BLOCK, BLOCK_M=MLP_BLOCK_M,
                                  WRITE_MEANS=True)),
        "dense_mlp_epilogue": (ct._dense_mlp_epilogue_kernel, [dict(num_warps=8, num_stages=1)],
                               dict(PRE=meta(B, HIDDEN, L), B1=meta(HIDDEN), ACT=meta(B, HIDDEN, L),
                                    MEANS=meta(B, NB, HIDDEN, dtype=torch.float32), spb=HIDDEN * L, sph=L,
                                    sab=HIDDEN * L, sah=L, L=L, HIDDEN=HIDDEN, NB=NB, TOKENS_PER_BLOCK=MLP_BLOCK,
                                    BLOCK_H=8192 // MLP_BLOCK, BM=MLP_BLOCK)),
        # One row per program, as top_ascending launches it: MLP neuron sets (12288 wide), attention key sets (4608).
        # Every search for the K-th largest key ("bitwise" unsuffixed): the autotuner picks one per row length on the GPU.
        "top_neurons": (ct._top_ascending_kernel, [dict(num_warps=16, num_stages=1)], top_neurons),
        "top_neurons_radix": (ct._top_ascending_kernel, [dict(num_warps=16, num_stages=1)],
                              dict(top_neurons, SEARCH="radix")),
        "top_and_random_neurons": (ct._top_and_random_kernel, [dict(num_warps=16, num_stages=1)], top_and_random),
        "top_and_random_neurons_seed_in_tensor": (ct._top_and_random_kernel, [dict(num_warps=16, num_stages=1)],
                                                  dict(top_and_random, SEED_IN_TENSOR=True)),
        # The layers' call: the change since the reference ranked in the kernel, bf16 scores, the seed in a tensor.
        "top_and_random_neurons_change": (ct._top_and_random_kernel, [dict(num_warps=16, num_stages=1)],
                                          dict(top_and_random, X=meta(NB, HIDDEN), SEED_IN_TENSOR=True,
                                               HAS_REF=True)),
        "top_and_random_neurons_radix": (ct._top_and_random_kernel, [dict(num_warps=16, num_stages=1)],
                                         dict(top_and_random, SEARCH="radix")),
        # The autotuner also times twice the warps up to 16 (half the keys per thread per round): no spills there.
        "top_keys_16_warps": (ct._top_ascending_kernel,
                              [dict(num_warps=16, num_stages=1, SEARCH=search) for search in ct.SELECTION_SEARCHES],
                              dict(X=meta(HEADS * G, L, dtype=torch.float32),
                                   OUT=meta(HEADS * G, NK_ATTN, dtype=torch.int32), N=L, K=NK_ATTN, sx=L,
                                   so=NK_ATTN, BLOCK=8192, SEARCH="bitwise")),
        "top_keys": (ct._top_ascending_kernel, [dict(num_warps=8, num_stages=1)],
                     dict(X=meta(HEADS * G, L, dtype=torch.float32), OUT=meta(HEADS * G, NK_ATTN, dtype=torch.int32),
                          N=L, K=NK_ATTN, sx=L, so=NK_ATTN, BLOCK=8192, SEARCH="bitwise")),
        "sparse_fc2": (ct._sparse_fc2_kernel, None, fc2),
        "sparse_fc2_uneven": (ct._sparse_fc2_kernel, None, dict(fc2, EVEN_K=False, EVEN_N=False)),
        "sparse_fc1_tma": (ct._sparse_fc1_tma_kernel, None, fc1_tma),
        "sparse_fc1_fp8": (ct._sparse_fc1_fp8_kernel, None, fc1_fp8),
        "sparse_fc1_tma_fp8": (ct._sparse_fc1_tma_fp8_kernel, None, fc1_tma_fp8),
        "sparse_fc2_fp8": (ct._sparse_fc2_fp8_kernel, None, fc2_fp8),
        "sparse_fc2_tma": (ct._sparse_fc2_tma_kernel, None, fc2_tma),
    }


def compile_for_h100(fn, args: dict, num_warps: int, num_stages: int):
    """Specializes the arguments with the JIT's own binder (16-divisibility, constexprs), as a launch would."""
    backend = make_backend(H100)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(**args, num_warps=num_warps, num_stages=num_stages)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=H100, options=options.__dict__)


def software_pipelined(ttgir: str) -> bool:
    """Whether the first loop waits for its async copies with some still in flight (num > 0). A pipelined loop keeps
    later iterations' loads outstanding; one that waits for all of them (num = 0) every step exposes memory latency
    (sparse fc2 ran at half of fc1's FLOP rate on the H100 so, its gather addresses loaded in the same step)."""
    body = ttgir[ttgir.index("scf.for"):].split("scf.yield")[0]
    return any(int(n) > 0 for n in re.findall(r"async_wait[^\n]*num = (\d+)", body))


def resource_usage(cubin: bytes) -> dict:
    """ptxas's REG / STACK / LOCAL for the kernel; the driver reports STACK + LOCAL as Triton's n_spills."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}


@pytest.fixture(scope="module")
def can_target_h100():
    """Skips (with the error) only if this Triton cannot build sm_90 code at all here; kernel errors still fail."""
    @triton.jit
    def probe(X):
        triton.language.store(X, 1.0)

    try:
        compile_for_h100(probe, dict(X=meta(1, dtype=torch.float32)), 4, 1)
    except Exception as e:  # noqa: BLE001 - any failure here is the toolchain's, not Chipmunk's
        pytest.skip(f"triton {triton.__version__} cannot compile for cuda sm_90 without a GPU: "
                    f"{type(e).__name__}: {str(e).strip()[-500:]}")
    if not CUOBJDUMP.exists():
        pytest.skip(f"no cuobjdump at {CUOBJDUMP} to read registers and spills from the cubin")


@pytest.mark.parametrize("name", list(kernel_args()))
def test_kernel_compiles_for_h100_without_spills(name, can_target_h100):
    kernel, fixed, args = kernel_args()[name]
    configs = fixed or [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=c.pre_hook)
                        for c in kernel.configs]
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    problems, report = [], []
    for config in configs:
        config = dict(config)
        num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
        pre_hook = config.pop("pre_hook", None)
        label = f"{name} {config} warps={num_warps} stages={num_stages}"
        launch = dict(args, **config)
        if pre_hook:  # as the autotuner does before a launch: the TMA kernels' descriptor boxes take the config's tile
            pre_hook(launch)
        compiled = compile_for_h100(fn, launch, num_warps, num_stages)
        usage, shared = resource_usage(compiled.asm["cubin"]), compiled.metadata.shared
        spills = usage["STACK"] + usage["LOCAL"]
        report.append(f"{label}: {usage['REG']} regs, {shared} B shared, {spills} B spilled")
        if spills or shared > H100_MAX_SHARED:
            problems.append(report[-1])
        if name not in ELEMENTWISE and not re.search(r"\bwgmma\.mma_async", compiled.asm["ptx"]):
            problems.append(f"{label}: tl.dot did not lower to wgmma (Hopper tensor cores)")
        if name in TMA and not re.search(r"\bcp\.async\.bulk\.tensor\.2d", compiled.asm["ptx"]):
            problems.append(f"{label}: the descriptor loads did not lower to TMA copies")
        if name in PIPELINED and num_stages >= 3 and not software_pipelined(compiled.asm["ttgir"]):
            problems.append(f"{label}: the loop is not software-pipelined (each step waits for all of its loads)")
    print("\n".join(report))
    assert not problems, "\n".join(problems)
