"""TokenFLEX as an lmms-eval model, at one vision-token count N per run, and a sweep over N:

    python -m lmms_eval --model tokenflex --tasks mme,pope --batch_size 8 \
        --model_args pretrained=runs/stage2/final,num_vision_tokens=64,device=cuda,dtype=bfloat16

lmms-eval finds it through its entry-point group `lmms_eval.models` (pipeline/lmms_eval_plugin.py,
named in pyproject.toml; installed with requirements-eval.txt). Run it from the repository
root, like the project's other commands, so that `pipeline` is importable.

Each request is one prompt with at most one image, built as tools.generate builds it
(TokenFlexVLM.prompt_ids: the image marker, a newline and the task's text in one user turn);
answers are greedy. Every batch's prefill (vision encoding + prompt forward, the part N
changes) is timed and reported through lmms-eval's throughput metrics as `prefill_ms`.

sweep() runs lmms-eval's simple_evaluate for every model folder at every N (tools/benchmark).
"""

import os
import statistics
import time

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image
from tqdm import tqdm

from pipeline.chat import IMAGE_TOKEN
from pipeline.inference import inference_placement
from pipeline.model import TokenFlexVLM, read_vlm_config


def default_device():
    # under `accelerate launch`, each process evaluates its share of the requests on its own GPU
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def load_model(path, device=None, dtype=None):
    """A model folder on `device` (default: this process's GPU, else cpu) in `dtype` (default:
    bfloat16 on GPU, float32 on CPU), in eval mode."""
    device, dtype = inference_placement(device or default_device(), dtype)
    return TokenFlexVLM.from_pretrained(path, device=device, dtype=dtype).eval()


class TokenFlexLMMs(lmms):
    """model_args: pretrained (a model folder, or a loaded TokenFlexVLM), num_vision_tokens,
    device (default: this process's GPU, else cpu), dtype (default: bfloat16 on GPU, float32 on
    CPU; ignored for a loaded model), batch_size (from --batch_size)."""

    def __init__(self, pretrained, num_vision_tokens=64, device=None, dtype=None, batch_size=1,
                 max_batch_size=None):  # lmms-eval passes its --max_batch_size; batches here have a fixed size
        super().__init__()
        loaded = isinstance(pretrained, TokenFlexVLM)
        self.model = pretrained.eval() if loaded else load_model(pretrained, device, dtype)
        self.num_vision_tokens = int(num_vision_tokens)
        self.model.config.check_token_count(self.num_vision_tokens)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate_until(self, requests):
        """Greedy answers, cut at the task's `until` strings; at most max_new_tokens (default 128)."""
        collator = utils.Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]), grouping=True)
        answers, prefill_seconds, started = [], [], time.perf_counter()
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"tokenflex N={self.num_vision_tokens}")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = greedy_options(all_gen_kwargs[0], tasks[0])
            images = [self.request_image(*request) for request in zip(doc_to_visual, tasks, splits, doc_ids)]
            prompts = [without_image_markers(c) for c in contexts]
            if not prefill_seconds:  # untimed: the first forward pays for allocation and set-up
                self.model.prefill_seconds(images, prompts, self.num_vision_tokens)
            embeds, attention_mask, seconds = self.model.timed_prefill(
                lambda: self.model.inference_inputs(images, prompts, self.num_vision_tokens))
            prefill_seconds.append(seconds)
            for answer in self.model.generate_from(embeds, attention_mask, gen_kwargs["max_new_tokens"]):
                answers.append(cut_at(answer, gen_kwargs["until"]))
            progress.update(len(chunk))
        progress.close()
        if prefill_seconds:
            elapsed = time.perf_counter() - started
            tokens = sum(len(self.model.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=tokens, avg_speed=tokens / elapsed,
                        additional_metrics={"num_vision_tokens": self.num_vision_tokens,
                                            "prefill_ms": 1000 * statistics.median(prefill_seconds)})
        return collator.get_original(answers)

    @torch.no_grad()
    def loglikelihood(self, requests):
        """(negative log-likelihood of the continuation after the prompt, summed over its tokens;
        whether greedy decoding gives exactly it) per request, the continuation scored as the
        assistant's reply. Negative because lmms-eval ranks choices by the smallest value (it
        expects a loss: api/task.py, multiple_choice)."""
        results = []
        for context, continuation, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], disable=self.rank != 0, desc="tokenflex loglikelihood"):
            if not isinstance(continuation, str):  # loglikelihood tasks give doc_to_target itself
                continuation = continuation(self.task_dict[task][split][doc_id])
            image = self.request_image(doc_to_visual, task, split, doc_id)
            prompt = self.model.prompt_ids(without_image_markers(context), image is not None)
            target = self.model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            pixel_values, image_mask = self.model.image_inputs([None if image is None else self.model.pixel_values([image])])
            embeds, attention_mask = self.model.prompt_embeddings([prompt + target], pixel_values, image_mask,
                                                                  self.num_vision_tokens)
            logits = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits
            # the last len(target) + 1 positions predict the target tokens
            log_probs = logits[0, -len(target) - 1:-1].float().log_softmax(-1)
            target = torch.tensor(target, device=log_probs.device)
            # lmms-eval 0.7.3 turns any other tuple into its str() (api/instance.py:
            # unwrap_generation_output); a GenerationResult's text is passed on as it is
            results.append(GenerationResult(text=(-float(log_probs.gather(-1, target[:, None]).sum()),
                                                  bool((log_probs.argmax(-1) == target).all()))))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tokenflex does not implement multi-round generation")

    def request_image(self, doc_to_visual, task, split, doc_id):
        """The request's image as RGB, or None; ValueError for more than one image or a video."""
        visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
        if len(visuals) > 1 or (visuals and not isinstance(visuals[0], Image.Image)):
            kinds = ", ".join(type(v).__name__ for v in visuals)
            raise ValueError(f"task {task}, doc {doc_id}: tokenflex takes at most one image per prompt, got {kinds}")
        return visuals[0].convert("RGB") if visuals else None


def greedy_options(gen_kwargs, task):
    """until (a list) and max_new_tokens from a task's generation_kwargs; ValueError for sampling or beams."""
    if gen_kwargs.get("do_sample") or gen_kwargs.get("num_beams", 1) > 1:
        raise ValueError(f"task {task} asks for sampling or beam search ({gen_kwargs}); tokenflex decodes greedily")
    until = gen_kwargs.get("until") or []
    return {"until": [until] if isinstance(until, str) else list(until),
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128))}


def without_image_markers(context):
    """The task's text without literal image markers: prompt_ids places the one image itself."""
    return context.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in context else context


def cut_at(answer, until):
    for stop in filter(None, until):
        answer = answer.split(stop, 1)[0]
    return answer.strip()


# ---- the sweep over N ----

def sweep(model_dirs, names, tasks, counts, limit=None, batch_size=1, device=None, dtype=None, include_path=None):
    """One result per model and N: lmms-eval's per-task results, its scores flattened to
    {"task metric": value}, every document's responses (an answer, or a (log-likelihood,
    is-greedy) pair per choice) and the median prefill per batch. Each model is
    loaded once for all N; one process (for data-parallel runs of one N, use lmms-eval's own
    CLI under `accelerate launch`)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    for path in model_dirs:
        for n in counts:
            read_vlm_config(path).check_token_count(n)
    task_manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"lmms-eval knows no task {', '.join(unknown)} (include path: {include_path})")
    results = []
    for name, path in zip(names, model_dirs, strict=True):
        model = load_model(path, device, dtype)
        for n in counts:
            output = simple_evaluate(model=TokenFlexLMMs(model, n, batch_size=batch_size), tasks=list(tasks),
                                     task_manager=task_manager, limit=limit, log_samples=True)
            prefill_ms = output.get("throughput", {}).get("avg_prefill_ms")  # absent without generation tasks
            results.append({
                "model": name, "path": str(path), "num_vision_tokens": n,
                "scores": flat_scores(output["results"]), "prefill_ms": prefill_ms,
                "samples": {task: len(samples) for task, samples in output["samples"].items()},
                "task_results": output["results"],
                "responses": {task: [{"doc_id": s["doc_id"], "target": s["target"], "responses": s["filtered_resps"]}
                                     for s in samples] for task, samples in output["samples"].items()},
            })
        del model
    return results


def flat_scores(task_results):
    """{"task metric": value} from lmms-eval's {task: {"metric,filter": value}}, without the
    stderrs; the filter joins the name when it is not "none"."""
    scores = {}
    for task, metrics in task_results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and "_stderr" not in metric and isinstance(value, (int, float)):
                scores[f"{task} {metric}" + ("" if filter_name == "none" else f" ({filter_name})")] = value
    return scores
