#!/usr/bin/env bash
# The GPU checks of issue 12 in one run (< 8 minutes on an H100): the CUDA tests,
# benchmarks/gpu.py, then benchmarks/gpu_profile.py.  Run from the repository root on a CUDA machine with torch, pandas,
# pyarrow (and transformers for the BERT model); nothing is downloaded.
#
#     bash benchmarks/gpu_check.sh            # results under $OUT (default: ./gpu-results)
#
# Writes $OUT/env.txt, $OUT/cuda-tests.txt, $OUT/gpu.md (the tables), $OUT/gpu.json and
# $OUT/profile.txt.
set -u
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this working tree, not an installed copy
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import torch, hookscope; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('hookscope', hookscope.__file__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Correctness on the GPU: the CUDA tests (offload, record_dataset, syncs) and the suites
#    that touch devices.  (About a minute.)
# The three timeouts together stay under the device tool's 600 s per command.
timeout 150 python -m pytest -q -rfEs -p no:cacheprovider tests/test_offload.py \
  tests/test_intervene.py tests/test_checkpointing.py tests/test_recorder.py tests/test_safety.py \
  tests/test_rnn.py \
  tests/test_dataset_reduce.py tests/test_fingerprint.py > "$OUT/cuda-tests.txt" 2>&1
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/cuda-tests.txt"

# 2. The figures (a few minutes).
timeout 300 python benchmarks/gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.md"

# 3. Where the time goes: profiler tables and the stack of each synchronisation.
timeout 120 python benchmarks/gpu_profile.py > "$OUT/profile.txt" 2>&1
grep -A14 -E "^### (synchronisations|host and wall)" "$OUT/profile.txt" | head -80
echo "done: $(ls "$OUT")"
