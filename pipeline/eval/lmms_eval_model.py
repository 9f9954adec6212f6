r"""TokenFLEX as an lmms-eval model, at one vision-token count N per run:

    python -m lmms_eval --model tokenflex --tasks mme,pope --batch_size 8 \
        --model_args pretrained=runs/stage2/final,num_vision_tokens=64,num_tiles=4,device=cuda,dtype=bfloat16

lmms-eval finds it through its entry-point group `lmms_eval.models` (pipeline/eval/lmms_eval_plugin.py,
named in pyproject.toml; installed with requirements-eval.txt). Run it from the repository
root, like the project's other commands, so that `pipeline` is importable.

Each request is one prompt with any number of images and videos (a document's visuals, in order:
PIL images, and videos as lmms-eval's video tasks give them, file paths), built as tools.generate
builds it (TokenFlexVLM.prompt_ids: an image marker and a newline per image or video, then the
task's text, in one user turn). num_tiles: at most this many tiles per image (pipeline/model/tiles.py;
default: what the model folder records). A video's frames are sampled as the folder records
(pipeline/model/video.py; num_frames: at most this many) and pooled to frame_tokens (M; default:
num_vision_tokens).

token_budget=B gives every request (generate_until and loglikelihood) at most B vision tokens in
all: its images and frames are all pooled to the largest square N whose slots (N per tile plus
row ends, N per frame plus a frame end) add up to at most B (pipeline/model/tiles.py:
count_within_budget; N = 1 when even that takes more); num_vision_tokens and frame_tokens are
then not used. So 8 frames at a budget of 2,048 get N = 225 each, 32 frames N = 49.
generate_until answers greedily; each batch's prompts run through the LM once, and that prefill
(vision encoding + prompt forward, the part N changes) is timed and reported through lmms-eval's
throughput metrics as `prefill_ms` (median over batches) with its quartiles. loglikelihood scores
each continuation as the assistant's reply, as training tokenizes it, in batches, encoding a
document's image once for all of its choices.

num_vision_tokens=adaptive (with threshold=, and ladder=, default 16-64-144-256: lmms-eval splits
model_args at commas) answers each generate_until request at the smallest N of the ladder whose
answer's probability reaches the threshold (pipeline/eval/adaptive.py: each batch's images encoded
once, re-pooled per try); take the threshold from `python -m tools.evaluate --tokens adaptive
--calibrate VALIDATION_SHARDS`. The probability is the whole generated answer's, before the
task's `until` cuts it, so a threshold calibrated on short answers suits tasks with short answers.
The throughput metrics add mean_vision_tokens (over the requests with an image), tries_per_image,
the threshold and the ladder (and at any N prefill_total_s, the prefill's seconds in all).
Log-likelihood requests are refused at num_vision_tokens=adaptive: the policy stops on a
generated answer's probability, and scoring given choices generates none; score them at a fixed N.
A sweep over N, tile counts and model folders: lmms_eval_sweep.py.
"""

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image
from tqdm import tqdm

from pipeline.eval.adaptive import DEFAULT_LADDER, adaptive_generate, check_ladder, mean_over_images
from pipeline.model.chat import IMAGE_TOKEN
from pipeline.model.folder import VLMConfig, read_vlm_config
from pipeline.model.inference import chunks_by_rows
from pipeline.model.inputs import Visual
from pipeline.model.runtime import inference_placement, prefill_summary
from pipeline.model.tiles import count_within_budget
from pipeline.model.vlm import TokenFlexVLM
from pipeline.train.distributed import task_gpu

DEFAULT_LADDER_ARG = "-".join(map(str, DEFAULT_LADDER))  # model_args' spelling: 16-64-144-256


def default_device() -> str:
    """This process's GPU, else cpu. Under `accelerate launch` each process evaluates its share of
    the requests on its own GPU: its local rank's, or the one GPU it sees when Slurm binds a GPU
    per task (pipeline.train.distributed.task_gpu)."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{task_gpu(int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count())}"


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> TokenFlexVLM:
    """A model folder on `device` (default: this process's GPU, else cpu) in `dtype` (default:
    bfloat16 on GPU, float32 on CPU), in eval mode."""
    device, dtype = inference_placement(device or default_device(), dtype)
    return TokenFlexVLM.from_pretrained(path, device=device, dtype=dtype).eval()


class TokenFlexLMMs(lmms):
    """model_args: pretrained (a model folder, or a loaded TokenFlexVLM), num_vision_tokens (a
    count, or adaptive with threshold and ladder: see the module docstring), num_tiles (at most
    this many tiles per image; default: the folder's recorded data.max_tiles), num_frames (at most
    this many frames per video; default: the folder's data.video_frames), frame_tokens (M per
    video frame; default: num_vision_tokens), token_budget (vision tokens per request: see the
    module docstring), device (default: this process's GPU, else cpu), dtype (default: bfloat16 on
    GPU, float32 on CPU; ignored for a loaded model), batch_size (from --batch_size)."""

    def __init__(self, pretrained: str | TokenFlexVLM, num_vision_tokens: int | str = 64, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, threshold: float | str | None = None,
                 ladder: str = DEFAULT_LADDER_ARG, num_tiles: int | str | None = None,
                 num_frames: int | str | None = None, frame_tokens: int | str | None = None,
                 token_budget: int | str | None = None,
                 max_batch_size: int | None = None):  # lmms-eval passes it; batches here have a fixed size
        super().__init__()
        loaded = isinstance(pretrained, TokenFlexVLM)
        self.adaptive = num_vision_tokens == "adaptive"
        if self.adaptive != (threshold is not None):
            raise ValueError("num_vision_tokens=adaptive needs threshold= (the answer probability that stops; "
                             "python -m tools.evaluate --tokens adaptive --calibrate picks one), and threshold= "
                             f"needs num_vision_tokens=adaptive (got num_vision_tokens={num_vision_tokens}, "
                             f"threshold={threshold})")
        if token_budget is not None and (self.adaptive or frame_tokens is not None):
            raise ValueError(f"token_budget={token_budget} picks N for every image and frame of a request: give it "
                             f"without num_vision_tokens=adaptive and frame_tokens= (got num_vision_tokens="
                             f"{num_vision_tokens}, frame_tokens={frame_tokens})")
        self.num_vision_tokens = "adaptive" if self.adaptive else int(num_vision_tokens)
        self.threshold = None if threshold is None else float(threshold)
        self.ladder = parse_ladder(ladder) if self.adaptive else None
        self.num_tiles = None if num_tiles is None else int(num_tiles)
        self.num_frames = None if num_frames is None else int(num_frames)
        self.frame_tokens = None if frame_tokens is None else int(frame_tokens)
        self.token_budget = None if token_budget is None else int(token_budget)
        for name in ("num_tiles", "num_frames", "token_budget"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not loaded:  # checked before the weights load
            self.check_token_counts(read_vlm_config(pretrained))
        self.model = pretrained.eval() if loaded else load_model(pretrained, device, dtype)
        self.check_token_counts(self.model.config)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")

    def check_token_counts(self, config: VLMConfig) -> None:
        if self.adaptive:
            check_ladder(self.ladder, config)
        else:
            config.check_token_count(self.num_vision_tokens)
        if self.frame_tokens is not None:
            try:
                config.check_token_count(self.frame_tokens)
            except ValueError as error:  # its message names num_vision_tokens
                raise ValueError(f"frame_tokens={self.frame_tokens}: {error}") from error

    def prepared(self, visuals: list[Visual]) -> dict:
        """A request's visuals prepared (tiles, sampled frames) at this model's limits."""
        return self.model.prepared_images(visuals, self.num_tiles, self.num_frames)

    def counts_for(self, sample: dict) -> tuple[int, int | None]:
        """(N, M) for a prepared request: token_budget's choice for both, else the model arguments'."""
        if self.token_budget is None:
            return self.num_vision_tokens, self.frame_tokens
        n = count_within_budget(sample["image_grids"], sample["frame_mask"], self.token_budget,
                                self.model.config.grid_side())
        return n, n

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, cut at the task's `until` strings; at most max_new_tokens (default 128).
        Each batch's prompts run through the LM once (at num_vision_tokens=adaptive, once per try);
        that prefill is timed (the first batch's time only warms up when there are others)."""
        collator = utils.Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]), grouping=True)
        answers, prefill_seconds, adaptive_results, started = [], [], [], time.perf_counter()
        chosen = []  # per request with an image or video: the N it was answered at
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"tokenflex N={self.num_vision_tokens}")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = greedy_options(all_gen_kwargs[0], tasks[0])
            samples = [self.prepared(self.request_visuals(*request))
                       for request in zip(doc_to_visual, tasks, splits, doc_ids)]
            for sample, context in zip(samples, contexts):
                sample["prompt_ids"] = self.model.prompt_ids(without_image_markers(context),
                                                             len(sample["frames_per_visual"]),
                                                             sample["frames_per_visual"])
            if self.adaptive:
                results, seconds = adaptive_generate(self.model, samples, self.ladder, self.threshold,
                                                     gen_kwargs["max_new_tokens"])
                batch_answers = [r["prediction"] for r in results]
                adaptive_results += results
            else:
                batch_answers, seconds = [None] * len(samples), 0.0
                groups = {}  # (N, M) -> the chunk's requests answered at it (one group without token_budget)
                for i, sample in enumerate(samples):
                    groups.setdefault(self.counts_for(sample), []).append(i)
                for (n, m), group in groups.items():
                    group_answers, group_seconds = self.model.timed_generate(
                        lambda group=group, n=n, m=m: self.model.prompt_embeddings(
                            [samples[i]["prompt_ids"] for i in group],
                            self.model.image_inputs([samples[i] for i in group]), n, m),
                        gen_kwargs["max_new_tokens"])
                    for i, answer in zip(group, group_answers):
                        batch_answers[i] = answer
                    seconds += group_seconds
                    chosen += [n] * sum(samples[i]["pixel_values"] is not None for i in group)
            answers += [cut_at(answer, gen_kwargs["until"]) for answer in batch_answers]
            prefill_seconds.append(seconds)
            progress.update(len(chunk))
        progress.close()
        if prefill_seconds:
            elapsed = time.perf_counter() - started
            tokens = sum(len(self.model.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
            adaptive = {"ladder": "-".join(map(str, self.ladder)), "threshold": self.threshold,
                        "mean_vision_tokens": mean_over_images(adaptive_results, "chosen_tokens"),
                        "tries_per_image": mean_over_images(adaptive_results, "tries")} if self.adaptive else {}
            budget = {"token_budget": self.token_budget,
                      "mean_vision_tokens": sum(chosen) / len(chosen) if chosen else None} if self.token_budget else {}
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=tokens, avg_speed=tokens / elapsed,
                        additional_metrics={"num_vision_tokens": self.num_vision_tokens, "num_tiles": self.num_tiles,
                                            "num_frames": self.num_frames, "frame_tokens": self.frame_tokens,
                                            **adaptive, **budget,
                                            **prefill_summary(prefill_seconds[1:] or prefill_seconds),
                                            "prefill_total_s": sum(prefill_seconds)})
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(negative log-likelihood of the continuation, whether greedy decoding gives exactly it)
        per request. The continuation is scored as the assistant's reply to the context, as
        training tokenizes it (TokenFlexVLM.reply_log_likelihoods): lmms-eval's leading delimiter
        dropped, split as the chat format splits it after the assistant header, its end token
        included. Negative because lmms-eval ranks choices by the smallest value (it expects a
        loss: api/task.py, multiple_choice). A document's requests (its choices) share one image
        encoding; batch_size replies go through the LM per forward. Refused at
        num_vision_tokens=adaptive (see the module docstring)."""
        if self.adaptive:
            raise NotImplementedError("tokenflex at num_vision_tokens=adaptive answers generate_until requests only: "
                                      "its policy stops on a generated answer's probability, and log-likelihood "
                                      "requests score given choices; run log-likelihood tasks at a fixed N "
                                      "(num_vision_tokens=64, ...)")
        documents = {}  # (task, split, doc_id, context) -> indices of its requests, one per choice
        for index, (context, _, _, doc_id, task, split) in enumerate(r.args for r in requests):
            documents.setdefault((task, split, doc_id, context), []).append(index)
        keys = list(documents)
        replies = [[self.continuation(requests[i].args) for i in documents[key]] for key in keys]
        results = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0,
                        desc=f"tokenflex loglikelihood N={self.num_vision_tokens}")
        for chunk in chunks_by_rows(replies, self.batch_size):  # only a chunk's images are held at a time
            samples, prompts = [], []
            for task, split, doc_id, context in (keys[i] for i in chunk):
                samples.append(self.prepared(self.request_visuals(
                    requests[documents[task, split, doc_id, context][0]].args[2], task, split, doc_id)))
                prompts.append(without_image_markers(context))
            groups = {}  # (N, M) -> positions in the chunk (one group without token_budget)
            for position, sample in enumerate(samples):
                groups.setdefault(self.counts_for(sample), []).append(position)
            scores = [None] * len(chunk)
            for (n, m), group in groups.items():
                group_scores = self.model.prepared_reply_log_likelihoods(
                    [samples[p] for p in group], [prompts[p] for p in group], [replies[chunk[p]] for p in group], n,
                    self.batch_size, m)
                for position, document_scores in zip(group, group_scores):
                    scores[position] = document_scores
            for i, document_scores in zip(chunk, scores):
                for index, (log_likelihood, greedy) in zip(documents[keys[i]], document_scores, strict=True):
                    # lmms-eval 0.7.3 turns any other tuple into its str() (api/instance.py:
                    # unwrap_generation_output); a GenerationResult's text is passed on as it is
                    results[index] = GenerationResult(text=(-log_likelihood, greedy))
            progress.update(sum(len(replies[i]) for i in chunk))
        progress.close()
        return results

    def continuation(self, args: tuple) -> str:
        """A loglikelihood request's continuation as a reply: lmms-eval's leading delimiter (a space) dropped."""
        context, continuation, _, doc_id, task, split = args
        if not isinstance(continuation, str):  # loglikelihood tasks give doc_to_target itself
            continuation = continuation(self.task_dict[task][split][doc_id])
        return continuation.strip()

    def generate_until_multi_round(self, requests: list[Instance]) -> NoReturn:
        raise NotImplementedError("tokenflex does not implement multi-round generation")

    def request_visuals(self, doc_to_visual: Callable[[dict], list | None], task: str, split: str,
                        doc_id: int) -> list[Visual]:
        """The request's images (as RGB) and videos (file paths), in the document's order (none:
        text-only); ValueError naming the document for another kind of visual (audio, say) or a
        video file that is missing."""
        visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
        for visual in visuals:
            if not isinstance(visual, (Image.Image, str)):
                raise ValueError(f"task {task}, doc {doc_id}: tokenflex takes images and video file paths, got "
                                 f"{type(visual).__name__}")
            if isinstance(visual, str) and not Path(visual).is_file():
                raise ValueError(f"task {task}, doc {doc_id}: video file {visual} not found")
        return [v.convert("RGB") if isinstance(v, Image.Image) else v for v in visuals]


def parse_ladder(ladder: str | int) -> list[int]:
    """'16-64-144-256' (model_args' spelling: lmms-eval splits them at commas) -> [16, 64, 144, 256]."""
    try:
        return [int(n) for n in str(ladder).split("-")]
    except ValueError:
        raise ValueError(f"ladder={ladder}: give token counts joined by '-', e.g. ladder=16-64-144-256") from None


def greedy_options(gen_kwargs: dict, task: str) -> dict:
    """until (a list) and max_new_tokens from a task's generation_kwargs; ValueError for sampling or beams."""
    if gen_kwargs.get("do_sample") or gen_kwargs.get("num_beams", 1) > 1:
        raise ValueError(f"task {task} asks for sampling or beam search ({gen_kwargs}); tokenflex decodes greedily")
    until = gen_kwargs.get("until") or []
    return {"until": [until] if isinstance(until, str) else list(until),
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128))}


def without_image_markers(context: str) -> str:
    """The task's text without literal image markers: prompt_ids places the images itself."""
    return context.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in context else context


def cut_at(answer: str, until: Sequence[str]) -> str:
    for stop in filter(None, until):
        answer = answer.split(stop, 1)[0]
    return answer.strip()
