#!/usr/bin/env bash
# Builds (here, with PyPI reachable) the wheel sets the GPU machines need: they have Python 3.12 and
# torch 2.11 and nothing else, no network, and take at most 64 MiB per device call, the tracked
# working tree (~5 MB) included: parts are 45 MiB (60 MiB parts were refused; docs/gpu.md).
#   .gpu_wheels/        megatron-core and the project's own needs (one call)
#   .gpu_parts/v00..06  vLLM 0.25.0 and its runtime (shared/gpu/vllm_gpu_wheels.sh), re-split
#   .gpu_parts/r00..01  Ray and Hydra for the driver, 40 MB parts (tar of .gpu_ray)
#   .gpu_parts/t00..04  Triton 3.7.1: fla's Hopper kernels refuse older (fla issue #640), and 3.9
#                       refuses fla 0.5.2's autotune keys at import ("key contains names that are
#                       not kernel arguments: BT"; 3.7.1 and 3.8.0 have no such check)
#   .gpu_fla/           flash-linear-attention and fla-core (pure Python)
# Usage: bash scripts/gpu/build_wheel_sets.sh [megatron|ray|vllm|triton|fla ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
P="--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64"
sets=("$@"); [ ${#sets[@]} -eq 0 ] && sets=(megatron ray vllm triton fla)
mkdir -p .gpu_parts
for set in "${sets[@]}"; do
  case $set in
    megatron)
      pip download -q $P --no-deps -d .gpu_wheels -r requirements/gpu-megatron.txt numpy safetensors pytest iniconfig pluggy \
        transformers==5.19.0 tokenizers==0.23.3 huggingface_hub==2.4.0 hf-xet regex pyyaml tqdm filelock fsspec \
        packaging typing_extensions einops httpx httpcore anyio h11 sniffio typer click shellingham rich \
        markdown_it_py mdurl pygments annotated-doc httpx2==2.16.2 httpcore2==2.16.2 idna truststore \
        loguru==0.7.3   # compressed-tensors' logger (vLLM's set takes it without dependencies); vLLM's Qwen3.5 imports it
      ;;
    ray)
      pip download -q $P --no-deps -d .gpu_ray ray==2.60.0 hydra-core==1.3.8 omegaconf==2.3.1 msgpack==1.2.4 \
        jsonschema referencing rpds-py jsonschema-specifications attrs protobuf==7.36.2 psutil
      pip wheel -q --no-deps -w .gpu_ray antlr4-python3-runtime==4.9.3   # an sdist on PyPI
      tar cf /tmp/gpu_ray.tar .gpu_ray && rm -f .gpu_parts/r0* && split -b 40m -d /tmp/gpu_ray.tar .gpu_parts/r ;;
    vllm)
      rm -rf /tmp/vllm_parts && bash ../shared/gpu/vllm_gpu_wheels.sh /tmp/vllm_parts
      rm -f .gpu_parts/v0* && cat /tmp/vllm_parts/p0* | split -b 45m -d - .gpu_parts/v ;;
    triton)
      rm -rf /tmp/gpu_triton && pip download -q $P --no-deps -d /tmp/gpu_triton triton==3.7.1
      tar cf /tmp/gpu_triton.tar -C /tmp gpu_triton && rm -f .gpu_parts/t0* && split -b 45m -d /tmp/gpu_triton.tar .gpu_parts/t ;;
    fla)
      pip download -q --no-deps -d .gpu_fla flash-linear-attention==0.5.2 fla-core==0.5.2 ;;
    *) echo "unknown set '$set': use megatron, ray, vllm, triton or fla" >&2; exit 2 ;;
  esac
done
ls -la .gpu_parts
