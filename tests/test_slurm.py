"""The sbatch scripts (training and slurm/build_shards.sh) and the submitit launcher, against a real
single-node Slurm (slurm/local_cluster.sh).

Outside CI these tests skip when the cluster can't be started (not root, Slurm not installed);
in CI (CI=true) they fail instead.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
# Two CPU processes on the GPU-less test node instead of the scripts' one-per-GPU defaults.
SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
STEPS = 6
pytestmark = pytest.mark.timeout(300)


def _cluster(command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLUSTER), command], check=False, capture_output=True, text=True, timeout=120)


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"Slurm test cluster unavailable in CI: {reason}")
    pytest.skip(f"Slurm test cluster unavailable: {reason}")


@pytest.fixture(scope="module")
def slurm():
    """A running cluster with SLURM_CONF set; started here if needed and then stopped again."""
    started = False
    if _cluster("status").returncode != 0:
        if os.geteuid() != 0:
            _unavailable("not root (the daemons run as root)")
        if shutil.which("slurmctld") is None:
            _unavailable("Slurm is not installed (run: slurm/local_cluster.sh install)")
        result = _cluster("start")
        if result.returncode != 0:
            _unavailable(f"slurm/local_cluster.sh start failed:\n{result.stderr}")
        started = True
    conf = _cluster("env").stdout.strip().removeprefix("export SLURM_CONF=")
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # for the scripts, sbatch, sacct and submitit alike
    yield conf
    if started:
        _cluster("stop")
    if old_conf is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = old_conf


@pytest.fixture(scope="module")
def train_args(tiny_models, mixture):
    """Config and overrides for a short 2-rank CPU run on the two-source mixture; call with the run's output dir."""
    def args(output_dir: Path) -> list[str]:
        return ["configs/tiny_cpu_stage1.yaml", f"model.vision_path={tiny_models / 'vision'}",
                f"model.lm_path={tiny_models / 'qwen2'}", f"data.shards={mixture}",
                f"train.output_dir={output_dir}",
                f"train.max_steps={STEPS}", "train.export_final=false", "wandb.mode=disabled"]
    return args


def sbatch(*args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id],
                         check=False, capture_output=True, text=True)
    # "CANCELLED by 0" -> "CANCELLED"; empty until the job reaches the accounting database.
    return (out.stdout.split() or ["PENDING"])[0]


def wait_for_job(job_id: str, timeout_s: float = 180) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job_state(job_id)
        if state in TERMINAL_STATES:
            return state
        time.sleep(1)
    details = subprocess.run(["scontrol", "show", "job", job_id], check=False, capture_output=True, text=True)
    subprocess.run(["scancel", job_id], check=False)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s (accounting state {state}); "
                       f"scontrol says:\n{details.stdout}{details.stderr}")


def losses(output_dir: Path) -> dict[int, float]:
    """step -> loss from the engine's metrics.jsonl (a resumed run appends; the last entry wins)."""
    text = (output_dir / "metrics.jsonl").read_text()
    lines = text.splitlines()[: text.count("\n")]  # not a line that is still being written
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def assert_resumed_mid_run(log: str):
    resumed = re.search(r"resumed from checkpoint \S+ at step (\d+)", log)
    assert resumed, f"no resume in the log:\n{log}"
    assert 0 < int(resumed[1]) < STEPS


@pytest.fixture(scope="module")
def sbatch_run(slurm, train_args, tmp_path_factory):
    """stage1.sh with two tasks, uninterrupted: (output dir, log text, final state). The
    submission names gloo's network interface, as on a cluster whose host names resolve to a
    network the other nodes can't reach."""
    tmp = tmp_path_factory.mktemp("sbatch_run")
    log = tmp / "job.log"
    job_id = sbatch(*SBATCH_CPU, "--export=ALL,GLOO_SOCKET_IFNAME=lo", f"--output={log}", f"--error={log}",
                    "slurm/stage1.sh", *train_args(tmp / "out"))
    state = wait_for_job(job_id)
    return tmp / "out", log.read_text(), state


def test_sbatch_two_tasks_completes_and_checkpoints(sbatch_run):
    output_dir, log, state = sbatch_run
    assert state == "COMPLETED", log
    assert "training finished with exit code 0" in log
    assert "network interfaces: GLOO_SOCKET_IFNAME=lo " in log  # the job script's line
    assert "gloo network interface: lo (GLOO_SOCKET_IFNAME)" in log  # rank 0's, from srun's environment
    assert max(losses(output_dir)) == STEPS
    assert (output_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:06d}"


def test_sbatch_preempted_job_requeues_and_resumes_exactly(slurm, train_args, sbatch_run, tmp_path):
    reference_dir, _, _ = sbatch_run
    log = tmp_path / "job.log"
    output_dir = tmp_path / "out"
    job_id = sbatch(*SBATCH_CPU, f"--output={log}", f"--error={log}", "slurm/stage1.sh",
                    *train_args(output_dir))
    # Interrupt once training has taken a few steps.
    deadline = time.time() + 120
    while not ((output_dir / "metrics.jsonl").exists() and len(losses(output_dir)) >= 2):
        assert time.time() < deadline, f"job {job_id} took no steps:\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)

    state = wait_for_job(job_id)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "requeueing job" in text
    assert "restart count 1" in text
    assert_resumed_mid_run(text)
    final = losses(output_dir)
    assert max(final) == STEPS
    assert final[STEPS] == pytest.approx(losses(reference_dir)[STEPS], rel=1e-6)


def test_submitit_two_tasks_survive_preemption(slurm, train_args, sbatch_run, tmp_path, monkeypatch):
    from pipeline.launch import submit

    reference_dir, _, _ = sbatch_run
    monkeypatch.chdir(REPO)  # the job runs in the submitting directory and imports pipeline from it
    output_dir = tmp_path / "out"
    config, *overrides = train_args(output_dir)
    job = submit(config, overrides, gpus_per_node=0, tasks_per_node=2,
                 cpus_per_task=1, time_min=60, cluster="slurm", folder=str(tmp_path / "submitit" / "%j"))
    # USR2 is submitit's preemption signal: all ranks save, rank 0 requeues, the job resumes.
    deadline = time.time() + 120
    while not ((output_dir / "metrics.jsonl").exists() and len(losses(output_dir)) >= 2):
        assert time.time() < deadline, f"submitit job {job.job_id} took no steps"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    assert job.results() == [0, 0]
    assert "Requeued job" in job.task(0).stdout()
    assert_resumed_mid_run(job.task(0).stderr())
    final = losses(output_dir)
    assert max(final) == STEPS
    assert final[STEPS] == pytest.approx(losses(reference_dir)[STEPS], rel=1e-6)


def test_sbatch_job_with_a_crashed_task_ends_failed_not_at_its_time_limit(slurm, train_args, tmp_path):
    """Task 1 raises at step 3 while task 0 stalls, as a rank blocked in an NCCL collective would,
    blind to its peer's death: srun --kill-on-bad-exit must end the step, and the job, at once."""
    log, marker, output_dir = tmp_path / "job.log", tmp_path / "fault-injected", tmp_path / "out"
    faults = (f"TOKENFLEX_TRAIN_MODULE=tests.crash_at_step,FAULT_AT_STEP=3,FAULT_RAISE_RANK=1,FAULT_STALL_RANK=0,"
              f"FAULT_MARKER={marker}")
    job_id = sbatch(*SBATCH_CPU, "--time=15", f"--export=ALL,{faults}", f"--output={log}", f"--error={log}",
                    "slurm/stage1.sh", *train_args(output_dir))
    deadline = time.time() + 180
    while not marker.exists():
        assert time.time() < deadline, f"job {job_id} injected no fault:\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.5)
    state = wait_for_job(job_id, timeout_s=60)
    text = log.read_text()
    assert state == "FAILED", text
    assert "RuntimeError: injected fault on rank 1 at step 3" in text
    assert "training finished with exit code" in text
    left = subprocess.run(["pgrep", "-f", str(output_dir)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the job outlived it: {left}"


def array_states(job_id: str) -> list[str]:
    """The accounting state of each task of an array job (empty until they reach the database)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                         check=False, capture_output=True, text=True).stdout
    return [line.split("|")[1].split()[0] for line in out.splitlines() if line.strip()]


def test_sbatch_array_build_equals_a_one_process_build(slurm, tmp_path):
    """slurm/build_shards.sh as a 2-task array: each task builds every other slice, the last to
    finish writes the manifest, and the folder equals a one-process build's byte for byte."""
    from tools import build_shards, make_synthetic

    make_synthetic.main(["--out", str(tmp_path / "raw"), "--n", "60", "--seed", "2", "--multi-image-fraction", "0.2"])
    args = ["--input", str(tmp_path / "raw" / "data.json"), "--image-root", str(tmp_path / "raw"),
            "--samples-per-shard", "8"]
    build_shards.main(args + ["--out", str(tmp_path / "one")])
    job_id = sbatch("--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/task-%a.log",
                    f"--error={tmp_path}/task-%a.log", "slurm/build_shards.sh", *args, "--out", str(tmp_path / "array"))
    deadline = time.time() + 180
    while not ((states := array_states(job_id)) and len(states) == 2 and set(states) <= TERMINAL_STATES):
        assert time.time() < deadline, f"array job {job_id} did not finish: {states}"
        time.sleep(1)
    logs = [(tmp_path / f"task-{i}.log").read_text() for i in range(2)]
    assert states == ["COMPLETED", "COMPLETED"], logs
    assert all(f"task {i} of 2" in log and "built 4 slices" in log for i, log in enumerate(logs)), logs

    def tree(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert tree(tmp_path / "array") == tree(tmp_path / "one")
