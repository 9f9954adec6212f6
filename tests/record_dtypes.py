"""Test-only entry point: pipeline.train that also records, per rank, what its engine holds.

    python -m tests.record_dtypes CONFIG [key=value ...]

Right after DeepSpeed set-up each rank writes <output_dir>/engine_dtypes/rank-<r>.json: for
every parameter of the model, the dtype and device of what the rank holds (its partition under
ZeRO-3), whether it trains and whether it was already ZeRO-partitioned when the stage handed the
model to the engine (loaded straight into partitions); the device of every buffer; the dtypes of
the optimizer's master weights; the dtype in which gradients are accumulated. The tests and
bench/gpu_check.sh read it.
"""

import json
import os
import sys
from pathlib import Path

from deepspeed.runtime.zero.utils import is_zero_param

from pipeline.engine import engine
from pipeline.train import loop
from pipeline.train.entry import main

real_build_engine = loop.build_engine


def recording_build_engine(model, param_groups, cfg, load_universal=False):
    partitioned = {name for name, p in model.named_parameters() if is_zero_param(p)}
    built = real_build_engine(model, param_groups, cfg, load_universal)
    record = {
        "parameters": {name: {"dtype": str(engine.held(p).dtype), "device": str(engine.held(p).device),
                              "trains": p.requires_grad, "partitioned_at_build": name in partitioned}
                       for name, p in built.module.named_parameters()},
        "buffers": {name: str(buffer.device) for name, buffer in built.module.named_buffers()},
        "master_weights": sorted({str(m.dtype) for m in engine.master_weights(built)}),
        "grad_accum": str(built.get_data_types()[1]),
    }
    folder = Path(cfg.train.output_dir) / "engine_dtypes"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(record, indent=1))
    return built


loop.build_engine = recording_build_engine

if __name__ == "__main__":
    sys.exit(main())
