"""A sweep of lmms-eval's tasks over model folders, tile counts and N (tools.benchmark): lmms-eval's
simple_evaluate for each, and the prefill of a probe batch timed at each.
"""

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from tenacity import RetryError

from pipeline.eval.lmms_eval_model import TokenFlexLMMs, load_model
from pipeline.model.folder import read_vlm_config
from pipeline.model.runtime import prefill_summary
from pipeline.model.tiles import recorded_tiling
from pipeline.model.vlm import TokenFlexVLM


class SweepError(Exception):
    """A task that failed for one model at one N; `result` holds that (model, N)'s finished tasks."""

    def __init__(self, result: dict, task: str, error: BaseException):
        self.result, self.task = result, task
        self.error = error.last_attempt.exception() if isinstance(error, RetryError) else error  # lmms-eval's retries
        super().__init__(f"model {result['model']} at N={result['num_vision_tokens']}, task {task}: "
                         f"{type(self.error).__name__}: {self.error}")


def probe_batch(model: TokenFlexVLM, batch_size: int, num_tiles: int | None = None
                ) -> tuple[list[Image.Image], list[str]]:
    """batch_size prompts, each with a plain image and a short question: the fixed batch whose
    prefill the sweep times at every N. The image is num_tiles (default: the folder's recorded
    max_tiles) tower inputs wide, so that it is cut into that many tiles (and a thumbnail)."""
    size = model.image_processor.size
    tiles = num_tiles or recorded_tiling(model.image_processor)[0]
    image = Image.new("RGB", (tiles * size["width"], size["height"]), (128, 128, 128))
    return [image] * batch_size, ["What colour is the background?"] * batch_size


def sweep(model_dirs: Sequence[str | Path], names: Sequence[str], tasks: Sequence[str], counts: Sequence[int],
          limit: int | None = None, batch_size: int = 1, device: str | torch.device | None = None,
          dtype: str | torch.dtype | None = None, include_path: str | None = None, timing_repeats: int = 5,
          tiles: Sequence[int | None] = (None,)) -> Iterator[dict]:
    """One result per model, tile count and N, yielded as it finishes: lmms-eval's per-task
    results, its scores flattened to {"task metric": value}, every document's prompt and
    responses (an answer, or a (negative log-likelihood, is-greedy) pair per choice) and the
    prefill latency (prefill_summary of timing_repeats timed prefills of probe_batch after a
    warm-up). tiles: the tile limits to run at (None: the folder's own); with several, each
    result's model name says its tile count ("name tiles=T"). Each model is loaded once for all
    tile counts and N, and every task runs on its own, so that a failure names it (SweepError).
    One process (for data-parallel runs of one N, use lmms-eval's own CLI under `accelerate launch`)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    for path in model_dirs:
        for n in counts:
            read_vlm_config(path).check_token_count(n)
    task_manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"lmms-eval knows no task {', '.join(unknown)} (include path: {include_path})")
    model = model_path = None
    for (name, path), num_tiles, n in itertools.product(zip(names, model_dirs, strict=True), tiles, counts):
        if model_path != path:
            model = None  # frees its memory before the next model loads
            model, model_path = load_model(path, device, dtype), path
        label = name if len(tiles) == 1 else f"{name} tiles={num_tiles}"
        result = {"model": label, "path": str(path), "num_vision_tokens": n, "num_tiles": num_tiles, "scores": {},
                  "samples": {}, "task_results": {}, "responses": {}, "prefill_ms": None, "prefill_ms_q1": None,
                  "prefill_ms_q3": None}
        for task in tasks:
            try:
                output = simple_evaluate(model=TokenFlexLMMs(model, n, batch_size=batch_size, num_tiles=num_tiles),
                                         tasks=[task], task_manager=task_manager, limit=limit, log_samples=True)
            except Exception as error:  # named, and handed on with the finished tasks
                raise SweepError(result, task, error) from error
            result["scores"] |= flat_scores(output["results"])
            result["task_results"] |= output["results"]
            for task_name, samples in output["samples"].items():
                result["samples"][task_name] = len(samples)
                # the prompt: the first argument of the document's requests, as lmms-eval logs it
                result["responses"][task_name] = [{"doc_id": s["doc_id"], "input": s["arguments"][0],
                                                   "target": s["target"], "responses": s["filtered_resps"]}
                                                  for s in samples]
        probe = probe_batch(model, batch_size, num_tiles)
        result |= prefill_summary(model.prefill_repeats(*probe, n, timing_repeats, num_tiles))
        yield result


def flat_scores(task_results: dict[str, dict]) -> dict[str, float]:
    """{"task metric": value} from lmms-eval's {task: {"metric,filter": value}}, without the
    stderrs; the filter joins the name when it is not "none"."""
    scores = {}
    for task, metrics in task_results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and "_stderr" not in metric and isinstance(value, (int, float)):
                scores[f"{task} {metric}" + ("" if filter_name == "none" else f" ({filter_name})")] = value
    return scores
