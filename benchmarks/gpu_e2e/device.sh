#!/bin/bash
# Steps of the GPU end-to-end run, on the device machine (repo root as cwd). Usage:
#   device.sh copy .whl/pN      put one carried folder of wheel pieces into /root/wheels
#   device.sh install           join the vLLM wheel, pip install the set into /root/site, register plugins
#   device.sh run ARGS...       python benchmarks/gpu_e2e/e2e.py run ARGS (environment set up)
#   device.sh test              the GPU tests of the backend
# The machine keeps /root/wheels and /root/site only while it stays warm between calls.
set -o pipefail
SITE=/root/site
WHEELS=/root/wheels
export PYTHONPATH="$PWD:$PWD/benchmarks/gpu_e2e:$SITE"
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export TINYSERVE_COMMIT="$(cat benchmarks/gpu_e2e/COMMIT 2>/dev/null || echo unknown)"
step="$1"; shift
case "$step" in
  copy)
    mkdir -p "$WHEELS" && cp "$1"/* "$WHEELS"/ && ls -la "$WHEELS" | tail -n +2 | wc -l && du -sh "$WHEELS" ;;
  install)
    cd "$WHEELS" || exit 1
    if ls vllm.whl.part.* >/dev/null 2>&1; then
      cat vllm.whl.part.* > vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm vllm.whl.part.*
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" ./*.whl || exit 1
    cd - >/dev/null
    d="$SITE/tinyserve_gpu_e2e-0.0.dist-info"; mkdir -p "$d"
    printf 'Metadata-Version: 2.1\nName: tinyserve-gpu-e2e\nVersion: 0.0\n' > "$d/METADATA"
    printf '[vllm.general_plugins]\ntinyserve = tinyserve.engine.vllm_compat:register\ntinyserve_e2e_kv = kv_sampler:register\n' > "$d/entry_points.txt"
    python3 -c "
import torch, vllm, pydantic, importlib.metadata as md
from vllm import LLM
from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE
print('vllm', vllm.__version__, 'torch', torch.__version__, 'pydantic', pydantic.__version__, 'FA3', FA3_AVAILABLE)
print('plugins', [e.value for e in md.entry_points(group='vllm.general_plugins')])
print(torch.cuda.get_device_name(0))" ;;
  run)
    python3 benchmarks/gpu_e2e/e2e.py run "$@" ;;
  test)
    python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_cuda_selection_backend.py "$@" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
