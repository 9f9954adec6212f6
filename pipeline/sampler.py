"""The token-count sampler: N for an optimizer step is a pure function of (seed, step).

Every rank and every gradient-accumulation micro-step computes the same N without any
communication; `check_same_across_ranks` is the cheap collective that proves it each step.
"""

import random

import torch
import torch.distributed as dist


class TokenCountSampler:
    def __init__(self, counts, seed=0):
        self.counts = sorted(counts)
        self.weights = [float(counts[c]) for c in self.counts]
        self.seed = seed

    def __call__(self, step):
        # a fresh generator per step: resuming at any step needs no sampler state
        return random.Random(self.seed * 1_000_003 + step).choices(self.counts, self.weights)[0]

    def state_dict(self):
        return {"counts": dict(zip(self.counts, self.weights)), "seed": self.seed}


def check_same_across_ranks(num_vision_tokens, stop_requested):
    """One all-reduce per step: fails if ranks disagree on N; returns whether any rank must stop.

    Folding the stop flag in here means a signal that reached one rank first stops all of
    them at the same step, instead of leaving the others waiting in the next collective.
    """
    if not dist.is_initialized():
        return stop_requested
    values = torch.tensor([num_vision_tokens, -num_vision_tokens, int(stop_requested)], dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    highest, lowest = int(values[0]), -int(values[1])
    if highest != lowest:
        raise RuntimeError(
            f"ranks disagree on the vision-token count for this step (min {lowest}, max {highest}); "
            f"every rank must use the same tokens.seed and tokens.counts"
        )
    return bool(values[2])
