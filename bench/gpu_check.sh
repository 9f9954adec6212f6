#!/usr/bin/env bash
# The real GPU path on one GPU: the demo's pipeline with NCCL and bf16, generation and evaluation
# on the GPU, and the training-step benchmark at real shapes. From the repo root:
#
#   bash bench/gpu_check.sh
#
# Work files go to runs/gpu_check/. Results: bench/gpu_check_results/ (log.txt, the evaluation
# table) and the GPU section of bench/train_step_results.md. Stops at the first failure.
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

run nvidia-smi
run python -c 'import torch; assert torch.cuda.is_available(), "no GPU visible to torch"'

# The demo's steps (tools/demo.py), on one GPU process: DeepSpeed ZeRO-3 over NCCL, bf16.
run python -m tools.make_tiny_models "$out/tiny"
run python -m tools.make_synthetic --out "$out/synthetic/train" --n 10000 --seed 0
run python -m tools.make_synthetic --out "$out/synthetic/heldout" --n 200 --seed 1
for split in train heldout; do
    run python -m tools.build_shards --json "$out/synthetic/$split/data.json" --image-root "$out/synthetic/$split" \
        --out "$out/shards/$split" --samples-per-shard 500
done
train=(python -m torch.distributed.run --nproc_per_node 1 --master_port 29512 -m pipeline.train)
common=("data.shards=$out/shards/train" train.precision=bf16 wandb.mode=offline)
run "${train[@]}" configs/tiny_cpu_stage1.yaml "${common[@]}" "model.vision_path=$out/tiny/vision" \
    "model.lm_path=$out/tiny/qwen2" "train.output_dir=$out/stage1"
run "${train[@]}" configs/tiny_cpu_stage2.yaml "${common[@]}" "model.init_from=$out/stage1/final" \
    "train.output_dir=$out/stage2"
run python -m tools.convert_checkpoint "$out/stage2/checkpoints" "$out/model" --dtype bf16
images=("$out"/synthetic/heldout/images/*)
run python -m tools.generate "$out/model" --image "${images[0]}" \
    --prompt "What colour is the background?" --tokens 64,144,256 --device cuda --dtype bf16
run python -m tools.evaluate "$out/model" --shards "$out/shards/heldout" --tokens 16,36,64,100,144,196,256 \
    --out "$out/eval" --device cuda --dtype bf16
cp "$out/eval/results.md" "$results/eval_results.md"

# The training step at real shapes (README, Benchmarks); liger's fused loss when it is installed.
losses=(supervised hf)
if python -c 'import liger_kernel' 2>/dev/null; then losses+=(liger); fi
run python -m bench.train_step --device cuda --lm 1.5b --batch 16 --loss "${losses[@]}" --n 64 144 256 729 mix --write-results

grep -q "backend cpu:gloo,cuda:nccl" "$results/log.txt" || { echo "error: training did not run on NCCL"; exit 1; }
echo -e "\nGPU check passed. Results: $results/ and bench/train_step_results.md"
