"""Submit a training run with submitit: to Slurm, or to this machine (--cluster local|debug).

    python -m pipeline.launch CONFIG.yaml [key.sub=value ...] --nodes 2 --gpus-per-node 8

Each task runs pipeline.train.entry.main in-process, one task per GPU.

Preemption and time limits. submitit asks Slurm for SIGUSR2 `signal_delay_s` seconds before the
time limit, to every task. Left alone, submitit's handler would, on rank 0 only and in the middle
of whatever step is running, call `checkpoint()`, requeue the job and exit: the other ranks would
be stuck in a collective and no DeepSpeed checkpoint would be saved. So TrainingJob replaces that
handler with `pipeline.train.checkpoint.request_stop()`, the same stop request the engine makes on
SIGUSR1/SIGTERM: every rank finishes its step, all ranks save the checkpoint together, and
pipeline.train.entry.main returns PREEMPTED_EXIT_CODE. Only then does TrainingJob run submitit's handler,
which (on rank 0) calls `checkpoint()` to re-pickle this job and runs `scontrol requeue`. The
requeued job points at the same train.output_dir and resumes from the latest checkpoint.

Note submitit's rule: a USR2 that arrives after 80% of the time limit (or later than 10 minutes
before it) counts as a timeout, and a job stops being requeued after `max_timeouts` of them; with
a limit under 50 minutes every USR2 counts as a timeout. A SIGTERM (real preemption) is handled
by the engine directly and requeues the same way.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import submitit


class TrainingJob:
    """The callable submitit runs in every task: one training process per GPU."""

    def __init__(self, config_path: str, overrides: list[str]):
        self.config_path = config_path
        self.overrides = list(overrides)

    def __call__(self) -> int:
        # Imported here so that submitting does not load torch and DeepSpeed.
        from pipeline.train import checkpoint, entry

        env = submitit.JobEnvironment()
        os.environ.update(
            MASTER_ADDR=env.hostnames[0],
            MASTER_PORT=str(master_port(env.job_id)),
            RANK=str(env.global_rank),
            WORLD_SIZE=str(env.num_tasks),
            LOCAL_RANK=str(env.local_rank),
        )
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda signum, frame: checkpoint.request_stop())

        code = entry.main([self.config_path, *self.overrides])
        if code == checkpoint.PREEMPTED_EXIT_CODE:
            # The checkpoint is saved; let submitit requeue (rank 0 re-pickles, requeues, exits).
            if callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)
            # Other ranks leave without a result: the requeued job will write it.
            sys.exit(code)
        if code != 0:
            raise RuntimeError(f"pipeline.train exited with code {code}")
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # Same config and overrides, so the same output dir: training resumes by itself.
        return submitit.helpers.DelayedSubmission(self)


def master_port(job_id: str) -> int:
    """A port shared by all tasks of a job and stable across requeues (job ids: 123, 123_4, DEBUG_9)."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 10000 + int(digits) % 20000


def submit(
    config_path: str,
    overrides: list[str] = (),
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: int | None = None,
    cpus_per_task: int = 10,
    time_min: int = 24 * 60,
    partition: str | None = None,
    account: str | None = None,
    cluster: str | None = None,
    folder: str = "slurm/logs/submitit/%j",
    signal_delay_s: int = 300,
    max_timeouts: int = 20,
) -> submitit.Job:
    """Submit one training run; returns the submitit job (use job.results() on multi-task jobs).

    tasks_per_node defaults to gpus_per_node (one process per GPU), or 1 without GPUs.
    cluster: "slurm", "local" or "debug"; None picks Slurm when it is available, else local.
    """
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"config not found: {config_path} (relative to {Path.cwd()})")
    if tasks_per_node is None:
        tasks_per_node = gpus_per_node or 1
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_timeouts)
    executor.update_parameters(
        name="tokenflex",
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        timeout_min=time_min,
        slurm_signal_delay_s=signal_delay_s,
    )
    if partition:
        executor.update_parameters(slurm_partition=partition)
    if account:
        executor.update_parameters(slurm_account=account)
    return executor.submit(TrainingJob(config_path, overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.launch",
        description="Submit a TokenFLEX training run with submitit (Slurm, or this machine).",
    )
    parser.add_argument("config", help="training config YAML, e.g. configs/stage1_align.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tasks-per-node", type=int, help="default: GPUs per node (1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument(
        "--cluster", choices=["slurm", "local", "debug"], help="default: Slurm if available, else local"
    )
    parser.add_argument("--folder", default="slurm/logs/submitit/%j", help="submitit logs and pickles (%%j: job id)")
    parser.add_argument(
        "--signal-delay-s",
        type=int,
        default=300,
        help="stop signal this long before the time limit, to save a checkpoint",
    )
    parser.add_argument("--max-timeouts", type=int, default=20, help="requeue after at most this many time limits")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its per-task results")
    args = parser.parse_intermixed_args(argv)

    job = submit(
        args.config,
        args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time_min=args.time,
        partition=args.partition,
        account=args.account,
        cluster=args.cluster,
        folder=args.folder,
        signal_delay_s=args.signal_delay_s,
        max_timeouts=args.max_timeouts,
    )
    print(f"submitted job {job.job_id}; logs in {job.paths.folder}")
    if args.wait:
        print(f"results: {job.results()}")
    return 0


if __name__ == "__main__":
    # Go through the module's real name so the pickled TrainingJob refers to
    # pipeline.launch.TrainingJob, not __main__.TrainingJob (unimportable in the job).
    from pipeline import launch  # noqa: PLW0406

    sys.exit(launch.main())
