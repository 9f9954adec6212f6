"""Benchmark TokenFlexVLM's forward + backward + AdamW step, at fixed N and the mix, on one device.

What it times is the model's own work, not pipeline.train's step: no DeepSpeed (no ZeRO-3
partitioning, gathering or reduction), a plain torch AdamW, and on cuda bf16 autocast over fp32
weights, where training keeps bf16 weights with fp32 masters. The training step itself is timed
by every training run (step_time_s and mfu in its metrics.jsonl; bench/gpu_check.sh runs some).

Models are random-init HF modules of real architectures (SigLIP vision tower, Qwen2 LM) wrapped
in the pipeline's TokenFlexVLM; batches are built directly from token ids: each row is one
sample, N image slots followed by --text-len text tokens, of which all but the first
--prompt-len are labelled (the answer). Every (N, loss) configuration runs in a fresh
subprocess, so its peak memory is its own and an out-of-memory error ends only that row.

  cuda (default when available): SigLIP-so400m-shaped tower (27x27 patches) and a Qwen2-0.5B or
      1.5B-shaped LM, bf16 autocast over fp32 weights (fp32 weights, gradients and AdamW
      state: 16 bytes/parameter, as much as DeepSpeed's bf16 holds), batch 16, text 512. MFU =
      useful FLOPs (pipeline.train.flops.step_flops: PaLM's convention, what the training run
      logs) / (step time x --peak-flops); peak memory = torch.cuda.max_memory_allocated.
  cpu: scaled-down shapes that keep the real 27x27 grid (so N up to 729) and a 32000-token
      vocabulary (so the logits' memory shows), fp32, batch 2, text 128. Peak memory = the
      process's peak RSS above what it held after building the model (grads, AdamW state,
      activations). Also measures the packer's padding fraction on synthetic shards.

Loss variants: supervised (TokenFlexVLM.forward: logits only on labelled rows), hf (plain HF
language_model(inputs_embeds, labels=...), full-vocabulary fp32 logits for every position),
liger (LigerFusedLinearCrossEntropyLoss on hidden states and lm_head.weight; GPU only,
pip install liger-kernel==0.8.5).

    python -m bench.train_step --device cpu --write-results
    python -m bench.train_step --device cuda --lm 1.5b --batch 16 --loss supervised hf liger --write-results
    python -m bench.train_step --device cuda --lm 1.5b --flops-only   # FLOPs from the shapes, nothing runs
    python -m bench.train_step --device cuda --lm 7b --text-len 128 --freeze-vision --freeze-lm --flops-only
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from pipeline.model.chat import IGNORE_INDEX
from pipeline.model.folder import VLMConfig
from pipeline.model.vlm import TokenFlexVLM
from pipeline.train.flops import Work, step_flops
from pipeline.train.sampler import TokenCountSampler

VISION = {
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14),
    # keeps the real 27x27 grid; sized so that tower FLOPs are ~30% of the LM's at N=256, as at 1.5B
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=384, patch_size=14),
}
LM = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000),
}
DEFAULTS = {  # per device: vision, lm, batch, text_len, steps
    "cuda": dict(vision="so400m", lm="1.5b", batch=16, text_len=512, steps=10),
    "cpu": dict(vision="small", lm="small", batch=2, text_len=128, steps=8),
}
MIX = {64: 1, 144: 1, 256: 1}  # TokenFLEX's 1:1:1 set, as in configs/stage*_*.yaml
RESULTS = Path(__file__).with_name("train_step_results.md")


# ---- the model and its batches ----

def build_model(args, device):
    lm_shape = LM[args.lm]
    vision = SiglipVisionModel(SiglipVisionConfig(**VISION[args.vision], attn_implementation="sdpa"))
    lm = Qwen2ForCausalLM(Qwen2Config(**lm_shape, tie_word_embeddings=True, max_position_embeddings=4096,
                                      attn_implementation="sdpa"))
    config = VLMConfig(vision_config=vision.config.to_dict(), text_config=lm.config.to_dict(),
                       image_token_id=lm_shape["vocab_size"] - 1)  # any id inside the vocabulary
    size = VISION[args.vision]["image_size"]
    processor = SiglipImageProcessor(size={"height": size, "width": size})  # SigLIP's: bicubic, mean and std 0.5
    model = TokenFlexVLM(config, vision, lm, tokenizer=None, image_processor=processor)
    if args.freeze_vision:  # stage 2's default (optim.vision_lr 0)
        model.vision_tower.requires_grad_(False)
    if args.freeze_lm:  # stage 1, with --freeze-vision: the projector alone trains
        model.language_model.requires_grad_(False)
    return model.to(device).train()


def make_batch(args, model, n, device):
    """One sample per row: N image slots, then text; the text after the prompt is labelled."""
    vocab = model.config.text_config["vocab_size"]
    image_size = model.vision_tower.config.image_size
    generator = torch.Generator().manual_seed(n)
    text = torch.randint(0, vocab - 1, (args.batch, args.text_len), generator=generator)
    slots = torch.full((args.batch, n), model.config.image_token_id)
    input_ids = torch.cat([slots, text], dim=1)
    labels = input_ids.clone()
    labels[:, :n + args.prompt_len] = IGNORE_INDEX
    batch = {
        "input_ids": input_ids, "labels": labels,
        "position_ids": torch.arange(input_ids.shape[1]).expand(args.batch, -1).contiguous(),
        "pixel_values": torch.randint(0, 256, (args.batch, 3, image_size, image_size), dtype=torch.uint8,
                                      generator=generator),
        "image_mask": torch.ones(args.batch, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


# ---- loss variants ----

def supervised_loss(model, batch, n):
    return model(batch, n).loss


def hf_loss(model, batch, n):
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"], n)
    return model.language_model(inputs_embeds=embeds, position_ids=batch["position_ids"],
                                labels=batch["labels"]).loss


def make_liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # GPU-only dependency

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def liger_loss(model, batch, n):
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"], n)
        hidden = model.language_model.model(inputs_embeds=embeds, position_ids=batch["position_ids"]).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        # the kernel wants one dtype; under autocast the hidden states are bf16, the master weight fp32
        weight = model.language_model.lm_head.weight.to(hidden.dtype)
        return fused(weight, hidden, batch["labels"][:, 1:].reshape(-1))

    return liger_loss


# ---- one configuration, in its own process ----

def measure(args):
    """Time args.n (one N or "mix") with args.loss; returns a dict of figures."""
    device = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.loss == "liger":
        if args.device != "cuda":
            raise SystemExit("--loss liger needs --device cuda (Liger's kernels are Triton)")
        loss_fn = make_liger_loss()
    else:
        loss_fn = {"supervised": supervised_loss, "hf": hf_loss}[args.loss]
    model = build_model(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda"
                else contextlib.nullcontext())
    counts = MIX if args.n == "mix" else {int(args.n): 1}
    sampler = TokenCountSampler(counts, args.seed)
    batches = {n: make_batch(args, model, n, device) for n in counts}
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step(n):
        with autocast:
            loss_fn(model, batches[n], n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # DeepSpeed clips too (optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        # warmup: every shape of the run, args.warmup times each; these steps are discarded
        for n in counts:
            for _ in range(args.warmup):
                step(n)
        sync()
        times = []  # (N, wall seconds, process CPU seconds)
        for s in range(args.steps):
            n = sampler(s)
            started, cpu_started = time.perf_counter(), time.process_time()
            step(n)
            sync()
            times.append((n, time.perf_counter() - started, time.process_time() - cpu_started))
    except torch.OutOfMemoryError:
        return {"oom": True}

    # medians: other jobs on shared machines add spikes that say nothing about the step
    by_n = {n: [(t, c) for m, t, c in times if m == n] for n in counts}
    drawn = {n: ts for n, ts in by_n.items() if ts}
    # the mix's draws need not be exactly 1:1:1: weighting each N's median equally removes that
    step_s = statistics.mean(statistics.median(t for t, _ in ts) for ts in drawn.values())
    cpu_s = statistics.mean(statistics.median(c for _, c in ts) for ts in drawn.values())
    # useful work, the same for every loss variant (hf and liger run lm_head on every position)
    flops = statistics.mean(step_flops(model, n, Work.of(batches[n], pad_token_id=None))[0] for n in drawn)
    result = {
        "step_s": step_s, "cpu_s": cpu_s, "samples_per_s": args.batch / step_s, "tflops_per_s": flops / step_s / 1e12,
        "spread": max((max(t for t, _ in ts) - min(t for t, _ in ts)) / statistics.median(t for t, _ in ts)
                      for ts in drawn.values()),
        "draws": {n: len(ts) for n, ts in by_n.items()},
    }
    if args.device == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_mem_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_built) / 2**20
    if args.peak_flops:
        result["mfu"] = result["tflops_per_s"] * 1e12 / args.peak_flops
    return result


def shape_flops(args):
    """Useful and executed FLOPs of one step per N, from the shapes alone: the model is built on
    the meta device and nothing runs."""
    with torch.device("meta"):
        model = build_model(args, "meta")
    flops = {n: step_flops(model, n, Work.of(make_batch(args, model, n, "cpu"), pad_token_id=None))
             for n in [*MIX, 729]}
    flops["mix"] = tuple(statistics.mean(flops[n][i] for n in MIX) for i in range(2))
    lines = [f"| N | useful TFLOP | executed TFLOP | step s at MFU 1.0 | samples/s at MFU {args.mfu} | "
             f"useful vs fixed 256 |", "|---|---|---|---|---|---|"]
    for n, (useful, executed) in flops.items():
        at_peak = f"{useful / args.peak_flops:.4f}" if args.peak_flops else "-"
        consumed = f"{args.batch * args.mfu * args.peak_flops / useful:.0f}" if args.peak_flops else "-"
        lines.append(f"| {n} | {useful / 1e12:.2f} | {executed / 1e12:.2f} | {at_peak} | {consumed} | "
                     f"{useful / flops[256][0]:.3f}x |")
    return lines


def gpu_samples_per_second(lm, stage, n, text_len=128, mfu=0.4):
    """Samples/s one GPU (--peak-flops' default, H100 SXM) consumes at `mfu` of useful work: lm in
    LM, stage 1 (projector only) or 2 (projector and LM; tower frozen), fixed N, batch 16."""
    args = parse_args(["--device", "cuda", "--flops-only", "--lm", lm, "--text-len", str(text_len),
                       "--mfu", str(mfu), "--freeze-vision", *(["--freeze-lm"] if stage == 1 else [])])
    with torch.device("meta"):
        model = build_model(args, "meta")
    useful, _ = step_flops(model, n, Work.of(make_batch(args, model, n, "cpu"), pad_token_id=None))
    return args.batch * mfu * args.peak_flops / useful


def run_in_subprocess(args, n, loss):
    command = [sys.executable, "-m", "bench.train_step", "--worker", "--device", args.device, "--n", str(n),
               "--loss", loss, "--vision", args.vision, "--lm", args.lm, "--batch", str(args.batch),
               "--text-len", str(args.text_len), "--prompt-len", str(args.prompt_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--threads", str(args.threads)]
    command += ["--peak-flops", str(args.peak_flops)] if args.peak_flops else []
    command += ["--freeze-vision"] if args.freeze_vision else []
    command += ["--freeze-lm"] if args.freeze_lm else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- packing ----

def packing_rows(args, work):
    """Padding fraction of pipeline.data.batches.TrainBatches with stage 1's data shape (seq_len 2048, 4 rows)."""
    from transformers import AutoImageProcessor

    from pipeline.data import TrainBatches
    from pipeline.model.chat import load_tokenizer
    from pipeline.run.config import DataConfig
    from tools import build_shards, make_synthetic, make_tiny_models

    make_tiny_models.make_tiny_models(work / "models")
    models = (load_tokenizer(work / "models" / "qwen2"), AutoImageProcessor.from_pretrained(work / "models" / "vision"))
    rows = []
    for name, extra in [("synthetic", []), ("LLaVA-like", ["--llava-like"])]:
        data = work / name
        make_synthetic.main(["--out", str(data), "--n", str(args.packing_samples), *extra])
        build_shards.build(str(data / "data.json"), str(data), str(work / (name + "_shards")), samples_per_shard=250)
        cfg = DataConfig(shards=str(work / (name + "_shards")), seq_len=2048, rows_per_batch=4, num_workers=0)
        for spec in [64, 144, 256, "mix"]:
            sampler = TokenCountSampler(MIX if spec == "mix" else {spec: 1}, args.seed)
            loader = TrainBatches(cfg, *models)
            stats = [loader.next_batch(sampler(s))["stats"] for s in range(args.packing_batches)]
            pad = sum(s["pad_tokens"] for s in stats)
            rows.append({"data": name, "n": spec, "padding": pad / (pad + sum(s["real_tokens"] for s in stats)),
                         "samples": statistics.mean(s["num_samples"] for s in stats),
                         "dropped": stats[-1]["total_dropped"], "truncated": stats[-1]["total_truncated"]})
    return rows


# ---- tables ----

def step_table(args, results):
    fixed_256 = {loss: r for (n, loss), r in results.items() if n == "256" and "step_s" in r}
    memory = "peak GiB allocated" if args.device == "cuda" else "peak RSS GiB above model"
    lines = [f"| N | loss | step s | CPU s | spread | samples/s | TFLOP/s | MFU | {memory} | vs fixed 256 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (n, loss), r in results.items():
        if "step_s" not in r:
            lines.append(f"| {n} | {loss} | {'OOM' if r.get('oom') else 'failed: ' + r['error']} |" + " |" * 7)
            continue
        ratio = ""
        if loss in fixed_256:
            ratio = f"{r['step_s'] / fixed_256[loss]['step_s']:.2f}x"
            if args.device == "cpu":  # wall time on a shared CPU is mostly other jobs; CPU time is the step's
                ratio += f" (CPU {r['cpu_s'] / fixed_256[loss]['cpu_s']:.2f}x)"
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        label = f"mix ({'/'.join(str(v) for v in r['draws'].values())})" if n == "mix" else n
        lines.append(
            f"| {label} | {loss} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {r['spread']:.0%} | "
            f"{r['samples_per_s']:.2f} | {r['tflops_per_s']:.3f} | {mfu} | {r['peak_mem_gib']:.2f} | {ratio} |"
        )
    return lines


def packing_table(rows):
    lines = ["| data | N | padding | samples/batch | dropped | truncated |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['data']} | {r['n']} | {r['padding']:.2%} | {r['samples']:.1f} | {r['dropped']} | {r['truncated']} |"
        for r in rows
    ]
    return lines


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, torch {torch.__version__}"
    )


def write_results(heading, body):
    """Replace the section with this heading in the results file, in place, or append it."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Training-step benchmark\n"
    top, *sections = text.split("\n## ")
    new = f"{heading}\n\n" + "\n".join(body) + "\n"
    headings = [s.split("\n", 1)[0] for s in sections]
    if heading in headings:
        sections[headings.index(heading)] = new
    else:
        sections.append(new)
    RESULTS.write_text("\n## ".join([top.rstrip("\n") + "\n", *sections]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", nargs="+", default=["64", "144", "256", "729", "mix"],
                        help="vision-token counts to time; 'mix' draws 64/144/256 1:1:1 per step "
                             "with pipeline.train.sampler.TokenCountSampler")
    parser.add_argument("--loss", nargs="+", default=None, choices=["supervised", "hf", "liger"],
                        help="default: supervised and hf")
    parser.add_argument("--vision", choices=sorted(VISION), help="tower shape (default: so400m on cuda, small on cpu)")
    parser.add_argument("--lm", choices=sorted(LM), help="LM shape (default: 1.5b on cuda, small on cpu)")
    parser.add_argument("--batch", type=int, help="samples per step (default: 16 on cuda, 2 on cpu)")
    parser.add_argument("--text-len", type=int, help="text tokens per sample (default: 512 on cuda, 128 on cpu)")
    parser.add_argument("--prompt-len", type=int, default=32, help="unlabelled text tokens before the answer")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default: 10 on cuda, 8 on cpu)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps per distinct N before timing")
    parser.add_argument("--seed", type=int, default=0, help="TokenCountSampler seed for the mix")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s for MFU (default: 989e12, H100 SXM dense bf16, on cuda; none on cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="cpu: torch threads (one keeps timings steady when other jobs share the cores)")
    parser.add_argument("--freeze-vision", action="store_true", help="no gradients for the tower (stage 2's default)")
    parser.add_argument("--freeze-lm", action="store_true",
                        help="no gradients for the LM (stage 1: with --freeze-vision, only the projector trains)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="--flops-only: the MFU at which to give the samples/s a GPU consumes (default: 0.4)")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the packer's padding fraction (default: on for cpu)")
    parser.add_argument("--packing-samples", type=int, default=3000, help="synthetic records per data set")
    parser.add_argument("--packing-batches", type=int, default=60, help="packed batches per N")
    parser.add_argument("--write-results", action="store_true", help=f"update {RESULTS.name} with this run")
    parser.add_argument("--flops-only", action="store_true",
                        help="print each N's useful and executed FLOPs per step from the shapes (model on the "
                             "meta device) and the step time that MFU 1.0 would take at --peak-flops; runs nothing")
    parser.add_argument("--worker", action="store_true", help="internal: run one --n/--loss and print JSON")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.peak_flops is None and args.device == "cuda":
        args.peak_flops = 989e12
    if args.loss is None:
        args.loss = ["supervised", "hf"]
    if args.packing is None:
        args.packing = args.device == "cpu"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.n, args.loss = args.n[0], args.loss[0]
        print(json.dumps(measure(args)))
        return 0
    if args.flops_only:
        print("\n".join(shape_flops(args)))
        return 0
    started = time.perf_counter()
    results = {}
    for loss in args.loss:
        for n in args.n:
            results[(n, loss)] = run_in_subprocess(args, n, loss)
            print(f"N={n} loss={loss}: {json.dumps(results[(n, loss)])}", flush=True)
    precision = "bf16 autocast over fp32 weights, no DeepSpeed" if args.device == "cuda" else "fp32, no DeepSpeed"
    body = [f"Run {datetime.date.today()} on {machine()}: `python -m bench.train_step "
            f"{' '.join(a for a in (argv if argv is not None else sys.argv[1:]) if a != '--write-results')}`.",
            f"Shapes: {args.vision} tower ({VISION[args.vision]}), {args.lm} LM ({LM[args.lm]}), tied embeddings, "
            f"sdpa, {precision}; batch {args.batch}, {args.text_len} text tokens per sample "
            f"({args.prompt_len} unlabelled), AdamW + grad clipping; {args.warmup} warmup steps per N discarded, "
            f"{args.steps} timed. Step s = median wall time per step (time.perf_counter); CPU s = median "
            f"process CPU time (steadier when other jobs share the machine); for the mix, each N's median "
            f"weighted equally (1:1:1; draws shown as 64/144/256). Spread = largest (max - min) / median "
            f"over the run's N. TFLOP/s: useful work by pipeline.train.flops.step_flops (PaLM's convention), "
            f"the same for every loss variant.", ""]
    body += step_table(args, results)
    if args.packing:
        with tempfile.TemporaryDirectory() as tmp:
            rows = packing_rows(args, Path(tmp))
        body += ["", f"Packer padding (pipeline.data.batches.TrainBatches, seq_len 2048, 4 rows per batch, "
                     f"{args.packing_batches} batches per N; the mix draws N per batch with TokenCountSampler):", ""]
        body += packing_table(rows)
    print("\n" + "\n".join(body))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.write_results:
        write_results(f"{args.device.upper()}: {args.lm} LM, batch {args.batch}, text {args.text_len}", body)
    failed = [f"N={n} loss={loss}" for (n, loss), r in results.items() if "error" in r or r.get("oom")]
    if failed:
        print(
            f"error: {len(failed)} configuration(s) failed or ran out of memory: {', '.join(failed)}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
