"""pipeline.train for bench/gpu_check.sh: it also records what each rank's engine holds
(tests/record_dtypes.py) and, on a GPU, which calls made the host wait for the device in the
first steps.

    python -m torch.distributed.run --nproc_per_node 1 -m bench.gpu_check_train CONFIG [key=value ...]

Steps 1 to SYNC_STEPS run under torch.cuda.set_sync_debug_mode("warn"): torch warns at every
call that synchronizes with the device (.item(), .tolist() or a copy of a device tensor, a
boolean mask, a blocking copy). Rank 0 writes <output_dir>/sync_report.json: per step, how many
there were and where they came from (file:line of the Python caller, most frequent first). Step
1 also pays for first-call set-up; later steps show the steady state.
"""

import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import tests.record_dtypes  # noqa: F401  (wraps the loop's build_engine)
from pipeline.run.config import load_config
from pipeline.train import entry, loop

SYNC_STEPS = 3
real_train_step = loop.train_step
report = []


def reporting_train_step(engine, data, num_vision_tokens, grad_accum, loss_reduction="token"):
    if len(report) >= SYNC_STEPS or not torch.cuda.is_available():
        return real_train_step(engine, data, num_vision_tokens, grad_accum, loss_reduction)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = real_train_step(engine, data, num_vision_tokens, grad_accum, loss_reduction)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
                    for w in caught if "synchroniz" in str(w.message))
    report.append({"step": len(report) + 1, "num_vision_tokens": num_vision_tokens,
                   "syncs": sum(sites.values()), "sites": dict(sites.most_common())})
    if dist.get_rank() == 0:
        report_file.write_text(json.dumps(report, indent=1))
    return result


loop.train_step = reporting_train_step

if __name__ == "__main__":
    args = entry.parse_args(sys.argv[1:])
    report_file = Path(load_config(args.config, args.overrides).train.output_dir) / "sync_report.json"
    sys.exit(entry.main())
