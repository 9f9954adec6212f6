#!/usr/bin/env bash
# The real GPU path on one GPU, what the CPU tests cannot run: the demo's pipeline with NCCL and
# bf16 (every parameter checked bf16 on the GPU), a task bound to one GPU at local rank 3 (srun
# --gpus-per-task=1), both stages with flash_attention_2 and its packed-equals-alone test when
# flash-attn is installed, generation and evaluation on the GPU, and the training-step benchmark
# at real shapes. Budgeted at about 10 minutes on one H100 (not yet measured). From the repo root:
#
#   bash bench/gpu_check.sh
#
# Work files go to runs/gpu_check/. Results: bench/gpu_check_results/ (log.txt, the evaluation
# table) and the GPU section of bench/train_step_results.md. Stops at the first failure, and
# exits non-zero when a benchmark row fails or runs out of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu_check
results=bench/gpu_check_results
mkdir -p "$results"
exec > >(tee "$results/log.txt") 2>&1
export PYTHONUNBUFFERED=1

run() {
    echo -e "\n\$ $*"
    "$@"
}

# OUTPUT_DIR of a run through tests/record_dtypes.py: every parameter its engine holds is bf16 on
# the GPU, with fp32 master weights and gradient accumulation.
check_bf16_on_gpu() {
    run python - "$1/engine_dtypes/rank-0.json" <<'PY'
import json, sys
record = json.load(open(sys.argv[1]))
wrong = {name: p for name, p in record["parameters"].items()
         if p["dtype"] != "torch.bfloat16" or not p["device"].startswith("cuda")}
assert not wrong, f"{len(wrong)} parameters not bf16 on the GPU, e.g. {dict(list(wrong.items())[:3])}"
assert (record["master_weights"], record["grad_accum"]) == (["torch.float32"], "torch.float32"), record
print(f"{len(record['parameters'])} parameters bf16 on the GPU; fp32 master weights and gradient accumulation")
PY
}

run nvidia-smi
run python -c 'import torch; assert torch.cuda.is_available(), "no GPU visible to torch"'

# The demo's steps (tools/demo.py), on one GPU process: DeepSpeed ZeRO-3 over NCCL, bf16.
run python -m tools.make_tiny_models "$out/tiny"
run python -m tools.make_synthetic --out "$out/synthetic/train" --n 10000 --seed 0
run python -m tools.make_synthetic --out "$out/synthetic/heldout" --n 200 --split test
for split in train heldout; do
    run python -m tools.build_shards --json "$out/synthetic/$split/data.json" --image-root "$out/synthetic/$split" \
        --out "$out/shards/$split" --samples-per-shard 500
done
# tests.record_dtypes is pipeline.train that also writes what each rank's engine holds
train=(python -m torch.distributed.run --nproc_per_node 1 --master_port 29512 -m tests.record_dtypes)
common=("data.shards=$out/shards/train" train.precision=bf16 wandb.mode=offline)
stage1=(configs/tiny_cpu_stage1.yaml "${common[@]}" "model.vision_path=$out/tiny/vision" "model.lm_path=$out/tiny/qwen2")
run "${train[@]}" "${stage1[@]}" "train.output_dir=$out/stage1"
check_bf16_on_gpu "$out/stage1"
run "${train[@]}" configs/tiny_cpu_stage2.yaml "${common[@]}" "model.init_from=$out/stage1/final" \
    "train.output_dir=$out/stage2"
check_bf16_on_gpu "$out/stage2"
grep -q "backend cpu:gloo,cuda:nccl" "$results/log.txt" || { echo "error: training did not run on NCCL"; exit 1; }

# A task that Slurm binds to one GPU sees only that one, whatever its local rank: started as srun
# starts it, with local rank 3 and one visible GPU.
visible=${CUDA_VISIBLE_DEVICES:-0}
run env RANK=0 WORLD_SIZE=1 LOCAL_RANK=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=29513 CUDA_VISIBLE_DEVICES="${visible%%,*}" \
    python -m pipeline.train "${stage1[@]}" train.max_steps=4 train.export_final=false "train.output_dir=$out/one_gpu_task"
grep -q "local rank 3 trains on GPU 0 of the 1 it sees" "$results/log.txt" || { echo "error: no per-task GPU"; exit 1; }

# flash-attention: both stages train with its kernels, and packed samples attend only within
# themselves, as alone (tests/test_model.py runs flash_attention_2 where flash-attn and a GPU are).
if python -c 'from transformers.utils import is_flash_attn_2_available as ok; assert ok()' 2>/dev/null; then
    flash=(model.attn_implementation=flash_attention_2)
    run "${train[@]}" "${stage1[@]}" "${flash[@]}" "train.output_dir=$out/flash_stage1"
    check_bf16_on_gpu "$out/flash_stage1"
    run "${train[@]}" configs/tiny_cpu_stage2.yaml "${common[@]}" "${flash[@]}" "model.init_from=$out/flash_stage1/final" \
        train.max_steps=100 train.save_every=100 "train.output_dir=$out/flash_stage2"
    check_bf16_on_gpu "$out/flash_stage2"
    run python -m pytest -q tests/test_model.py -k "packed_samples_do_not_attend and flash_attention_2"
else
    echo -e "\nflash-attn is not installed: flash_attention_2 not checked (pip install flash-attn --no-build-isolation)"
fi

run python -m tools.convert_checkpoint "$out/stage2/checkpoints" "$out/model" --dtype bf16
images=("$out"/synthetic/heldout/images/*)
run python -m tools.generate "$out/model" --image "${images[0]}" \
    --prompt "What colour is the background?" --tokens 64,144,256 --device cuda --dtype bf16
run python -m tools.evaluate "$out/model" --shards "$out/shards/heldout" --tokens 16,36,64,100,144,196,256 \
    --out "$out/eval" --device cuda --dtype bf16
cp "$out/eval/results.md" "$results/eval_results.md"

# The training step at real shapes (README, Benchmarks); liger's fused loss when it is installed.
# It exits non-zero when a row fails or runs out of memory, after writing the results.
losses=(supervised hf)
if python -c 'import liger_kernel' 2>/dev/null; then losses+=(liger); fi
run python -m bench.train_step --device cuda --lm 1.5b --batch 16 --loss "${losses[@]}" --n 64 144 256 729 mix --write-results

echo -e "\nGPU check passed. Results: $results/ and bench/train_step_results.md"
