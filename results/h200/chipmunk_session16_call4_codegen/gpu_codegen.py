# One-off on the device: inductor's CUDA code for a Chipmunk single block (tiny pipeline, chipmunk-tiny config,
# regional compile): where the MLP's start op sits against the QKV matmul, and what runs between the attention op
# and the MLP join. The CPU test tests/test_chipmunk.py checks the same on CPU code.
import re, sys, torch
sys.path.insert(0, ".")
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code
from utils.benchmark_utils import create_parser, resolved_defaults, pipeline_call_kwargs
from utils.pipeline_utils import load_pipeline
from utils import chipmunk

args = resolved_defaults(create_parser().parse_args(["--ckpt", "tiny", "--device", "cuda", "--chipmunk_config",
                                                     "configs/chipmunk-tiny.yml", "--num_inference_steps", "4"]))
pipe = load_pipeline(args)
print(chipmunk.apply_chipmunk(pipe, args))
pipe.transformer.compile_repeated_blocks(fullgraph=True)
run = lambda: pipe(**pipeline_call_kwargs(args), generator=torch.manual_seed(0), output_type="latent").images
with inductor_config.patch(fx_graph_cache=False):
    _, codes = run_and_get_code(run)
single = [c for c in codes if "chipmunk_mlp_start" in c]
print(f"{len(codes)} compiled modules, {len(single)} with the MLP start op")
for code in single:
    body = code[code.index("def call(self, args)"):]
    body = body[:body.index("\n        return ")]
    lines = [l for l in body.splitlines() if l.strip() and not l.strip().startswith(("del ", "assert_", "#"))
             and "empty_strided" not in l]
    print("\n".join(lines))
    start = re.search(r"chipmunk_mlp_start\.default\((buf\d+),", code)
    qkv = re.search(r"extern_kernels\.\w*mm\(.*reinterpret_tensor\(" + start.group(1) + r",", code)
    attention, join = code.index("chipmunk_attention.default("), code.index("chipmunk_mlp.default(")
    copies = re.findall(r"\n\s*(\w*(?:cat|clone)\w*)\(", code[attention:join])
    print(f"MLP start before the QKV matmul: {bool(qkv) and start.start() < qkv.start()}; "
          f"copy kernels between the attention op and the MLP join: {copies}")
