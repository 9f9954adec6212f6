"""Checkpoint conversion for a resume at another world size runs before the process group exists:
rank 0 converts, the other ranks wait on the file system (no collective, so no timeout)."""

import shutil
import threading
import time

import pytest
import torch.distributed as dist

from pipeline.checkpoint import conversion_failure_file, prepare_universal, universal_dir

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
