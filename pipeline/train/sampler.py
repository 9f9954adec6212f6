"""The token-count sampler: N for an optimizer step is a pure function of (seed, step).

Every rank and every gradient-accumulation micro-step computes the same N without any
communication; `check_same_across_ranks` is the cheap collective that proves it each step.
"""

import random
from pathlib import Path

import torch.distributed as dist

from pipeline.train.distributed import max_over_ranks


class TokenCountSampler:
    def __init__(self, counts: dict[int, float], seed: int = 0):
        self.counts = sorted(counts)
        self.weights = [float(counts[c]) for c in self.counts]
        self.seed = seed

    def __call__(self, step: int) -> int:
        # a fresh generator per step: resuming at any step needs no sampler state
        return random.Random(self.seed * 1_000_003 + step).choices(self.counts, self.weights)[0]

    def state_dict(self) -> dict:
        return {"counts": dict(zip(self.counts, self.weights)), "seed": self.seed}

    def check_resumes(self, saved: dict, where: str | Path) -> None:
        """ValueError naming tokens.counts or tokens.seed when `saved` (the state_dict of the run a
        checkpoint in `where` comes from) differs: resuming would draw other token counts from then on."""
        saved_counts = {int(count): float(weight) for count, weight in saved["counts"].items()}  # JSON keys are str
        changed = [f"tokens.{key} is {now} but was {before}" for key, now, before in (
            ("counts", self.state_dict()["counts"], saved_counts), ("seed", self.seed, saved["seed"])) if now != before]
        if changed:
            raise ValueError(f"{' and '.join(changed)} in the run that wrote {where}: the resumed run would draw other "
                             f"token counts than the one it continues. Restore them, or set "
                             f"tokens.allow_change_on_resume=true to resume with the new ones")


def check_same_across_ranks(num_vision_tokens: int, stop_requested: bool) -> bool:
    """One all-reduce per step: fails if ranks disagree on N; returns whether any rank must stop.

    Folding the stop flag in here means a signal that reached one rank first stops all of
    them at the same step, instead of leaving the others waiting in the next collective.
    """
    if not dist.is_initialized():
        return stop_requested
    highest, minus_lowest, stop = max_over_ranks([num_vision_tokens, -num_vision_tokens, int(stop_requested)])
    if highest != -minus_lowest:
        raise RuntimeError(
            f"ranks disagree on the vision-token count for this step (min {-minus_lowest}, max {highest}); "
            f"every rank must use the same tokens.seed and tokens.counts"
        )
    return bool(stop)
