"""Where and in what the model runs: dtypes by name, the device and dtype inference picks, copies
to the device, and timing work that a device runs asynchronously.

Model folders carry this module as transformers remote code (see modeling_tokenflex.py).
"""

import statistics
import time
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

# Every spelling the tools (--dtype) and the lmms-eval model (dtype=) accept: the short names
# and torch's own (bfloat16, as lmms-eval's model_args give it).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name in DTYPES or a torch dtype; ValueError naming the accepted names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def inference_placement(device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) to run inference with: by default cuda when torch sees a GPU, else cpu;
    bf16 on a GPU, fp32 elsewhere."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"device {device!r}: {error}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {device}: torch {torch.__version__} sees {torch.cuda.device_count()} CUDA GPU(s) here"
        )
    return device, as_dtype(dtype or ("bf16" if device.type == "cuda" else "fp32"))


def on_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """tensor on device, copied without waiting (from pinned memory the copy overlaps the device's work)."""
    return None if tensor is None else tensor.to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on device (nothing to wait for on CPU)."""
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)


class PrefillClock(LogitsProcessor):
    """Seconds from its creation until generation first asks it about logits, i.e. until the
    prompt's forward has finished. Kernels run asynchronously on an accelerator, so the clock
    reads only after the device has finished its queued work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = None
        synchronize(device)
        self.started = time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.seconds is None:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.started
        return scores


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median and quartiles, in milliseconds, of timed runs: the median is the latency, q1 to q3
    its spread."""
    ms = sorted(1000 * s for s in seconds)
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"median": median, "q1": q1, "q3": q3, "runs": len(ms)}


def prefill_summary(seconds: Sequence[float]) -> dict[str, float]:
    """The latency of timed prefills and its spread, named as results, tables and lmms-eval's
    throughput summary name them: prefill_ms (the median), prefill_ms_q1 and prefill_ms_q3."""
    timing = latency_ms(seconds)
    return {"prefill_ms": timing["median"], "prefill_ms_q1": timing["q1"], "prefill_ms_q3": timing["q3"]}
