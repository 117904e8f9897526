# Source this at the start of every command on an offline GPU node (H100 or H200):
#
#   source scripts/gpu_env.sh && python3 scripts/bench_stages.py ... ; save_inductor_cache "$OUT"
#
# * installs the wheels that `scripts/download_wheels.sh` put in .whl/ (diffusers, torchao, FA3, cache-dit,
#   the metric packages) into /tmp/site, once per machine, and puts them on PYTHONPATH;
# * points TorchInductor's on-disk caches (FX graphs, AOT autograd, Triton autotuning) at $TORCHINDUCTOR_CACHE_DIR
#   (default /tmp/inductor_cache) and fills it from .inductor_cache/inductor_cache.tgz.* when those came along: a
#   cold float8 regional compile of FLUX.1 took 359 s on the H100, and a fresh machine starts with an empty /tmp;
# * save_inductor_cache DIR writes DIR/inductor_cache.tgz.00, .01, ... (15 MiB parts); copy them to
#   .inductor_cache/ (git-ignored) here and carry that folder next time. The cache is keyed by GPU, torch/Triton
#   versions and the graphs themselves, so a stale archive only costs its transfer, never a wrong kernel.
#   It leaves out Triton's compiled binaries (triton/: ~190 MB, 31 MB packed after one float8 compile, too much to
#   carry beside the 38 MB of wheels under the 64 MiB limit): the FX graphs, AOT-autograd entries and autotuning
#   choices (the slow part: coordinate-descent tuning) come back, and the kernels recompile from source in
#   parallel. `save_inductor_cache DIR full` keeps the binaries too.
# * save_aoti_cache DIR does the same for the AOTInductor packages in $FLUX_AOTI_DIR (/tmp/flux-harness-aoti, the
#   stage script's --cache-dir): copy the aoti_cache.tgz.NN parts to .aoti_cache/ and carry it, and a package
#   built in one command is timed in the next (packages hold no weights; their keys name GPU and torch).
# * log_gpu_clocks FILE samples SM clock, power and throttle reasons every second in the background (kill it
#   with `kill %1` or let the command end): a step time that differs between GPUs of one kind is read against it.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ! PYTHONPATH=/tmp/site python3 -c "import diffusers, torchao" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1 || true  # else every first import compiles diffusers
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
if ls .inductor_cache/inductor_cache.tgz.* >/dev/null 2>&1 && [ -z "$(ls -A "$TORCHINDUCTOR_CACHE_DIR")" ]; then
  cat .inductor_cache/inductor_cache.tgz.* | tar xz -C "$TORCHINDUCTOR_CACHE_DIR" && echo "[gpu_env] inductor cache restored"
fi

# AOTInductor builds each package's .so with $CXX. Some GPU images set CXX=/opt/gcc/bin/g++ (a wrapper around
# g++-real 13.3), and every CUDA package it built crashed the loader (std::regex's locale facets, inside the .so);
# /usr/bin/g++ builds packages that load and match eager (docs/DESIGN.md). Only that one value of CXX is replaced.
if [ "$CXX" = /opt/gcc/bin/g++ ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi

export FLUX_AOTI_DIR=${FLUX_AOTI_DIR:-/tmp/flux-harness-aoti}
mkdir -p "$FLUX_AOTI_DIR"
if ls .aoti_cache/aoti_cache.tgz.* >/dev/null 2>&1 && [ -z "$(ls -A "$FLUX_AOTI_DIR")" ]; then
  cat .aoti_cache/aoti_cache.tgz.* | tar xz -C "$FLUX_AOTI_DIR" && echo "[gpu_env] AOTI packages restored: $(ls "$FLUX_AOTI_DIR")"
fi

_save_parts() {  # _save_parts SRC_DIR DEST_DIR NAME [tar options]: in 15 MiB parts (the device returns <= 16 MiB a file)
  local src=$1 dest=$2 name=$3; shift 3
  tar cz "$@" -C "$src" . | split -b 15M -d - "$dest/$name.tgz." &&
    echo "[gpu_env] $name: $(cat "$dest/$name".tgz.* | wc -c) bytes in $(ls "$dest/$name".tgz.* | wc -l) parts $dest/$name.tgz.NN"
}

save_inductor_cache() {  # save_inductor_cache DIR [full]
  if [ "$2" = full ]; then _save_parts "$TORCHINDUCTOR_CACHE_DIR" "$1" inductor_cache
  else _save_parts "$TORCHINDUCTOR_CACHE_DIR" "$1" inductor_cache --exclude=./triton; fi
}

save_aoti_cache() { _save_parts "$FLUX_AOTI_DIR" "$1" aoti_cache; }

log_gpu_clocks() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -l 1 >"$1" 2>&1 &
}
