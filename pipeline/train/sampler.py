"""The token-count sampler: N (per image tile) and M (per video frame) for an optimizer step are pure
functions of (seed, step).

Every rank and every gradient-accumulation micro-step computes the same N and M without any
communication; `check_same_across_ranks` is the cheap collective that proves it each step.
"""

import random
from pathlib import Path

import torch.distributed as dist

from pipeline.train.distributed import max_over_ranks


class TokenCountSampler:
    def __init__(self, counts: dict[int, float], seed: int = 0, frame_counts: dict[int, float] | None = None):
        self.counts = sorted(counts)
        self.weights = [float(counts[c]) for c in self.counts]
        frame_counts = frame_counts or counts
        self.frame_counts = sorted(frame_counts)
        self.frame_weights = [float(frame_counts[c]) for c in self.frame_counts]
        self.seed = seed

    def _draws(self, step: int) -> random.Random:
        # a fresh generator per step: resuming at any step needs no sampler state
        return random.Random(self.seed * 1_000_003 + step)

    def __call__(self, step: int) -> int:
        """N for the step."""
        return self._draws(step).choices(self.counts, self.weights)[0]

    def frame_count(self, step: int) -> int:
        """M for the step: the same generator's next draw after N's (so N is what it was before frames had one)."""
        draws = self._draws(step)
        draws.choices(self.counts, self.weights)
        return draws.choices(self.frame_counts, self.frame_weights)[0]

    def state_dict(self) -> dict:
        return {"counts": dict(zip(self.counts, self.weights)),
                "frame_counts": dict(zip(self.frame_counts, self.frame_weights)), "seed": self.seed}

    def check_resumes(self, saved: dict, where: str | Path) -> None:
        """ValueError naming tokens.counts, tokens.frame_counts or tokens.seed when `saved` (the
        state_dict of the run a checkpoint in `where` comes from) differs: resuming would draw other
        token counts from then on. A checkpoint written before frame counts existed drew none."""
        now = self.state_dict()

        def as_counts(counts: dict) -> dict:
            return {int(count): float(weight) for count, weight in counts.items()}  # JSON keys are str

        pairs = [("counts", now["counts"], as_counts(saved["counts"])), ("seed", self.seed, saved["seed"])]
        if "frame_counts" in saved:
            pairs.insert(1, ("frame_counts", now["frame_counts"], as_counts(saved["frame_counts"])))
        changed = [f"tokens.{key} is {value} but was {before}" for key, value, before in pairs if value != before]
        if changed:
            raise ValueError(f"{' and '.join(changed)} in the run that wrote {where}: the resumed run would draw other "
                             f"token counts than the one it continues. Restore them, or set "
                             f"tokens.allow_change_on_resume=true to resume with the new ones")


def check_same_across_ranks(num_vision_tokens: int, stop_requested: bool, num_frame_tokens: int = 0) -> bool:
    """One all-reduce per step: fails if ranks disagree on N or M; returns whether any rank must stop.

    Folding the stop flag in here means a signal that reached one rank first stops all of
    them at the same step, instead of leaving the others waiting in the next collective.
    """
    if not dist.is_initialized():
        return stop_requested
    highest, minus_lowest, highest_m, minus_lowest_m, stop = max_over_ranks(
        [num_vision_tokens, -num_vision_tokens, num_frame_tokens, -num_frame_tokens, int(stop_requested)])
    for what, high, low, keys in (("vision-token count", highest, -minus_lowest, "tokens.counts"),
                                  ("frame-token count", highest_m, -minus_lowest_m, "tokens.frame_counts")):
        if high != low:
            raise RuntimeError(f"ranks disagree on the {what} for this step (min {low}, max {high}); every rank must "
                               f"use the same tokens.seed and {keys}")
    return bool(stop)
