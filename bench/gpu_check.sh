#!/usr/bin/env bash
# The GPU path on one GPU, what the CPU tests cannot run: both stages with NCCL and bf16 on the
# shapes training meets (4 tiles per image, wide, tall and two-image scenes, 2 rows per batch, 2
# micro-batches per step, gradient checkpointing, the square loss), with every parameter and
# buffer checked on the GPU and the host's waits for the device reported per step; a task bound
# to one GPU at local rank 3 (srun --gpus-per-task=1); flash_attention_2 when flash-attn is
# installed; conversion, generation and evaluation on the GPU; the benchmark's GPU rows.
#
#   bash bench/gpu_check.sh
#
# Needs requirements.txt installed. Every command has a time limit, so a hang ends the check.
# By its own step counts it takes about 7 minutes on one H100 (estimate, not yet measured: models
# and data 1 min, each torchrun start 30 s, stage 1's 12 and stage 2's 24 steps of the tiny models
# 1.5 min with their starts, the one-GPU task 40 s, conversion, generation and evaluation at 3 N
# 1 min, 2 benchmark rows at 1.5B 2 min); the flash-attention part adds about 2 minutes where
# flash-attn is installed. Work files go to runs/gpu_check/. Results: bench/gpu_check_results/
# (log.txt, sync_report.md, the evaluation table) and the GPU section of bench/train_step_results.md.
# Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu_check
results=bench/gpu_check_results
mkdir -p "$results"
exec > >(tee "$results/log.txt") 2>&1
export PYTHONUNBUFFERED=1

# limited SECONDS COMMAND...: print the command, run it, kill it after SECONDS
limited() {
    local seconds=$1
    shift
    echo -e "\n\$ $*   (limit ${seconds}s)"
    timeout --kill-after=15 "$seconds" "$@"
}

# OUTPUT_DIR of a run through bench/gpu_check_train.py (tests/record_dtypes.py's record): every
# parameter its engine holds is bf16 on the GPU, every buffer on the GPU, with fp32 master weights
# and gradient accumulation; the tower and the LM came to the engine already partitioned.
check_engine_on_gpu() {
    limited 60 python - "$1/engine_dtypes/rank-0.json" <<'PY'
import json, sys
record = json.load(open(sys.argv[1]))
parameters, buffers = record["parameters"], record["buffers"]
wrong = {name: p for name, p in parameters.items() if p["dtype"] != "torch.bfloat16" or not p["device"].startswith("cuda")}
assert not wrong, f"{len(wrong)} parameters not bf16 on the GPU, e.g. {dict(list(wrong.items())[:3])}"
off = {name: device for name, device in buffers.items() if not device.startswith("cuda")}
assert not off, f"{len(off)} buffers not on the GPU: {off}"
whole = sorted({name.split(".")[0] for name, p in parameters.items() if not p["partitioned_at_build"]})
assert whole == ["projector", "tile_layout"], f"built whole before the engine: {whole}"
assert (record["master_weights"], record["grad_accum"]) == (["torch.float32"], "torch.float32"), record
print(f"{len(parameters)} parameters bf16 and {len(buffers)} buffers on the GPU; fp32 master weights and "
      f"gradient accumulation; tower and LM loaded partitioned")
PY
}

# OUTPUT_DIR's sync report, appended to sync_report.md
report_syncs() {
    limited 60 python - "$1/sync_report.json" "$2" >>"$results/sync_report.md" <<'PY'
import json, sys
steps = json.load(open(sys.argv[1]))
print(f"\n## {sys.argv[2]}\n\n| step | N | syncs | where (file:line x count) |\n|---|---|---|---|")
for step in steps:
    sites = ", ".join(f"{site} x{count}" for site, count in step["sites"].items())
    print(f"| {step['step']} | {step['num_vision_tokens']} | {step['syncs']} | {sites} |")
PY
}

limited 30 nvidia-smi
limited 60 python -c 'import torch; assert torch.cuda.is_available(), "no GPU visible to torch"'
rm -rf "$out"
echo "# Host waits for the device per training step (bench/gpu_check.sh, $(date -u +%F))" >"$results/sync_report.md"

# The demo's models; data with the shapes training meets: wide, tall and two-image scenes.
limited 300 python -m tools.make_tiny_models "$out/tiny"
limited 120 python -m tools.make_synthetic --out "$out/synthetic/train" --n 2000 --seed 0 --wide-fraction 0.3 \
    --multi-image-fraction 0.3
limited 60 python -m tools.make_synthetic --out "$out/synthetic/heldout" --n 100 --split test
for split in train heldout; do
    limited 120 python -m tools.build_shards --input "$out/synthetic/$split/data.json" \
        --image-root "$out/synthetic/$split" --out "$out/shards/$split" --samples-per-shard 250
done

train=(python -m torch.distributed.run --nproc_per_node 1 --master_port 29512 -m bench.gpu_check_train)
common=("data.shards=$out/shards/train" train.precision=bf16 wandb.mode=offline data.max_tiles=4
        data.multi_image_max_tiles=2 data.rows_per_batch=2 train.grad_accum=2 train.gradient_checkpointing=true
        train.loss_reduction=square)
stage1=(configs/tiny_cpu_stage1.yaml "${common[@]}" "model.vision_path=$out/tiny/vision" "model.lm_path=$out/tiny/qwen2"
        train.max_steps=12 train.save_every=12)
stage2=(configs/tiny_cpu_stage2.yaml "${common[@]}" "model.init_from=$out/stage1/final" train.max_steps=24
        train.save_every=12)
limited 300 "${train[@]}" "${stage1[@]}" "train.output_dir=$out/stage1"
check_engine_on_gpu "$out/stage1"
report_syncs "$out/stage1" "stage 1"
limited 300 "${train[@]}" "${stage2[@]}" "train.output_dir=$out/stage2"
check_engine_on_gpu "$out/stage2"
report_syncs "$out/stage2" "stage 2"
grep -q "backend cpu:gloo,cuda:nccl" "$results/log.txt" || { echo "error: training did not run on NCCL"; exit 1; }

# A task that Slurm binds to one GPU sees only that one, whatever its local rank: started as srun
# starts it, with local rank 3 and one visible GPU.
visible=${CUDA_VISIBLE_DEVICES:-0}
limited 240 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=29513 \
    CUDA_VISIBLE_DEVICES="${visible%%,*}" python -m pipeline.train "${stage1[@]}" train.max_steps=4 \
    train.export_final=false "train.output_dir=$out/one_gpu_task"
grep -q "local rank 3 trains on GPU 0 of the 1 it sees" "$results/log.txt" || { echo "error: no per-task GPU"; exit 1; }

# flash-attention: both stages train with its kernels, packed samples given their boundaries
# (cu_seq_lens), and packed samples attend only within themselves, as alone.
if python -c 'from transformers.utils import is_flash_attn_2_available as ok; assert ok()' 2>/dev/null; then
    flash=(model.attn_implementation=flash_attention_2)
    limited 300 "${train[@]}" "${stage1[@]}" "${flash[@]}" "train.output_dir=$out/flash_stage1"
    check_engine_on_gpu "$out/flash_stage1"
    limited 300 "${train[@]}" configs/tiny_cpu_stage2.yaml "${common[@]}" "${flash[@]}" \
        "model.init_from=$out/flash_stage1/final" train.max_steps=12 train.save_every=12 \
        "train.output_dir=$out/flash_stage2"
    check_engine_on_gpu "$out/flash_stage2"
    report_syncs "$out/flash_stage2" "stage 2, flash_attention_2"
    limited 300 python -m pytest -q tests/test_model.py -k "packed_samples_do_not_attend and flash_attention_2"
else
    echo -e "\nflash-attn is not installed: flash_attention_2 not checked (pip install flash-attn --no-build-isolation)"
fi

limited 120 python -m tools.convert_checkpoint "$out/stage2/checkpoints" "$out/model" --dtype bf16
images=("$out"/synthetic/heldout/images/*)
limited 120 python -m tools.generate "$out/model" --image "${images[0]}" \
    --prompt "What colour is the background?" --tokens 16,64,144 --device cuda --dtype bf16
limited 180 python -m tools.evaluate "$out/model" --shards "$out/shards/heldout" --tokens 16,64,144 \
    --out "$out/eval" --device cuda --dtype bf16
cp "$out/eval/results.md" "$results/eval_results.md"

# The benchmark's GPU rows: TokenFlexVLM's forward, backward and AdamW step under bf16 autocast
# on one GPU, without DeepSpeed (what they time: bench/train_step.py). The runs above log the
# training step itself (step_time_s, mfu in their metrics.jsonl).
limited 300 python -m bench.train_step --device cuda --lm 1.5b --batch 16 --loss supervised --n 256 mix \
    --steps 5 --warmup 1 --write-results

cat "$results/sync_report.md"
echo -e "\nGPU check passed. Results: $results/ and bench/train_step_results.md"
