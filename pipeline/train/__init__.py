"""Training one stage (python -m pipeline.train): the loop, the step, and what they need around them.

    entry.py        the command: arguments, the config, checks, run
    preflight.py    every input a run needs, checked before anything starts, named by its key
    loop.py         the run on one rank: model and engine from its stage, steps, checkpoints, the final export
    step.py         one optimizer step: micro-batches at one N on every rank, the step's weighted loss
    sampler.py      N for each step: a pure function of the seed and the step, checked the same on every rank
    metrics.py      each step's metrics summed over ranks; metrics.jsonl, wandb, the progress bar, the log
    flops.py        a step's work and FLOPs, useful and executed
    checkpoint.py   save, resume at any world size, stop on Slurm's signals
    distributed.py  the process group (NCCL for CUDA tensors, gloo for the project's own), rank, GPU binding
"""
