"""Checkpoint conversion for a resume at another world size runs before the process group exists:
rank 0 converts, the other ranks wait on the file system (no collective, so no timeout). The
RNG state a checkpoint keeps restores whatever number of GPUs the resuming process sees."""

import shutil
import threading
import time

import pytest
import torch
import torch.distributed as dist

from pipeline.run.layout import conversion_failure_file, universal_dir
from pipeline.train.checkpoint import prepare_universal, rng_state, set_rng_state

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def two_rank_checkpoint(stage1_run, tmp_path):
    """A copy of the 2-rank stage-1 run's latest checkpoint: (checkpoints folder, that checkpoint)."""
    source = stage1_run / "checkpoints"
    tag = (source / "latest").read_text()
    shutil.copytree(source / tag, tmp_path / "checkpoints" / tag)
    shutil.copy(source / "latest", tmp_path / "checkpoints" / "latest")
    return tmp_path / "checkpoints", tmp_path / "checkpoints" / tag


def in_thread(function, *args):
    """Start function(*args) in a thread; returns the thread and a dict that gets "result" or "error"."""
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args)
        except RuntimeError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_rank_0_converts_while_the_others_wait_on_the_file_system(two_rank_checkpoint):
    ckpt_dir, checkpoint = two_rank_checkpoint
    assert prepare_universal(ckpt_dir, 0, 2) is False  # the world size it was written by: nothing to do
    waiting, outcome = in_thread(prepare_universal, ckpt_dir, 1, 3)
    time.sleep(3)
    assert waiting.is_alive(), f"rank 1 did not wait for rank 0's conversion: {outcome}"
    assert prepare_universal(ckpt_dir, 0, 3) is True
    waiting.join(timeout=30)
    assert outcome == {"result": True}
    assert not dist.is_initialized()
    assert universal_dir(checkpoint).is_dir() and not conversion_failure_file(checkpoint).exists()


def test_a_failed_conversion_stops_every_rank_until_its_error_file_is_deleted(two_rank_checkpoint):
    ckpt_dir, checkpoint = two_rank_checkpoint
    (checkpoint / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    waiting, outcome = in_thread(prepare_universal, ckpt_dir, 2, 4)
    with pytest.raises(RuntimeError, match=f"checkpoint {checkpoint} was written by 2 ranks and this run has 4"):
        prepare_universal(ckpt_dir, 0, 4)
    waiting.join(timeout=30)
    assert "converting it to a universal checkpoint failed" in outcome["error"]
    assert f"delete {conversion_failure_file(checkpoint)} to try the conversion again" in outcome["error"]
    assert not universal_dir(checkpoint).exists()
    with pytest.raises(RuntimeError, match="converting it to a universal checkpoint failed"):
        prepare_universal(ckpt_dir, 1, 4)  # a later start, too, without trying again


class VisibleGpus:
    """torch.cuda's RNG functions over `count` emulated GPUs, the process on GPU `current`: one
    generator state per visible device, as torch keeps them (set_rng_state_all indexes one
    generator per saved state, so it fails on fewer devices than states)."""

    def __init__(self, monkeypatch, count, current):
        self.states, self.current = [torch.tensor([device], dtype=torch.uint8) for device in range(count)], current
        for name in ("is_available", "current_device", "get_rng_state", "set_rng_state", "get_rng_state_all",
                     "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        return True

    def current_device(self):
        return self.current

    def get_rng_state(self, device="cuda"):
        return self.states[self.current].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self.current] = state.clone()

    def get_rng_state_all(self):
        return [state.clone() for state in self.states]

    def set_rng_state_all(self, states):
        for device, state in enumerate(states):
            self.states[device] = state.clone()  # IndexError past the visible devices


def test_a_resume_restores_its_own_gpus_rng_whatever_number_of_gpus_the_process_sees(monkeypatch):
    """Saved under torchrun on an 8-GPU node by local rank 3, resumed under srun --gpus-per-task=1
    (one visible GPU, index 0): the process's generator gets rank 3's state back."""
    saved_by = VisibleGpus(monkeypatch, count=8, current=3)
    state = rng_state()
    assert torch.equal(state["cuda"], saved_by.states[3])
    resumed_by = VisibleGpus(monkeypatch, count=1, current=0)
    set_rng_state(state)
    assert torch.equal(resumed_by.states[0], saved_by.states[3])
