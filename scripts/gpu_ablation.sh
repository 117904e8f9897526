#!/usr/bin/env bash
# The ablation harness on one Hopper GPU (or more), without the real weights: stack_flux_dev.yaml with
# --ckpt random:flux-dev (full-size FLUX.1-dev architecture, random weights: timings are real, images
# are noise, so the quality columns only show that the metrics run). Budget < 6 minutes:
#   * $PROMPTS prompts (default 2), 1 seed, $STEPS denoising steps (default 10, not 28; stated in the summary's
#     command line);
#   * eager only (--base compile_export_mode=disabled): torch.compile / export_aoti would spend
#     minutes compiling per variant. So the variants are bf16 eager (baseline), the eager stack (QKV
#     fusion + FA3 + float8), and each of those three layers disabled in turn ($VARIANTS overrides the list);
#   * random-init metric models (the node has no metric weights).
# With 2+ GPUs it also runs the same sweep as a 2-process torchrun (NCCL).
# Writes summaries, plots, records and timing under $OUT (default runs/ablation).
#
#   bash scripts/gpu_ablation.sh            # from the project root; OUT=/some/dir to choose the output
#   PROMPTS=32 STEPS=28 VARIANTS=no_quant bash scripts/gpu_ablation.sh   # the wall-time check: few variants
#       (few pipeline builds), many images, so fixed start-up costs are amortized as in a real sweep
#   PACK=1 ...                               # also <name>.tgz of the results
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/ablation}
WORK=${WORK:-/tmp/ablation}            # images stay here (1024^2 noise PNGs are ~3 MB each)
mkdir -p "$OUT" "$WORK"

# Offline node: the wheels fetched by `scripts/download_wheels.sh`, if they came along.
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

ARGS=(--config configs/ablations/stack_flux_dev.yaml
      --base ckpt=random:flux-dev --base num_inference_steps="${STEPS:-10}" --base compile_export_mode=disabled
      --variants "${VARIANTS:-full,no_qkv_fusion,no_fa3,no_quant}"
      --limit_prompts "${PROMPTS:-2}" --seeds_per_prompt 1 --warmup_runs 1 --metrics_random_init)

copy_results() {  # tables, plots, records and timing; not the images
  mkdir -p "$2"
  cp "$1"/summary.* "$1"/*.png "$1"/*.pdf "$1"/records.jsonl "$1"/timing.json "$1"/config.yaml "$2"/ 2>/dev/null || true
  cp "$1"/metrics.jsonl "$1"/metrics_sets.json "$2"/ 2>/dev/null || true
  if [ -n "${PACK:-}" ]; then tar czf "$2.tgz" -C "$2" .; fi
}

rm -rf "$WORK/stack_flux_dev"
python3 run_ablation.py "${ARGS[@]}" --output_dir "$WORK/stack_flux_dev" 2>&1 | tee "$OUT/stack_flux_dev.log"
copy_results "$WORK/stack_flux_dev" "$OUT/stack_flux_dev"

NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then
  rm -rf "$WORK/stack_flux_dev_torchrun"
  torchrun --nproc-per-node 2 run_ablation.py "${ARGS[@]}" --output_dir "$WORK/stack_flux_dev_torchrun" 2>&1 \
    | tee "$OUT/stack_flux_dev_torchrun.log"
  copy_results "$WORK/stack_flux_dev_torchrun" "$OUT/stack_flux_dev_torchrun"
fi
echo "results in $OUT"
