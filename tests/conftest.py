"""Fixtures shared by several test files (plain helpers are in eval_testdata.py)."""
import builtins
import os

import pytest
import torch

import utils
from eval_testdata import one_thread, write_dino_checkpoint

# one_thread is defined beside the helpers, where files import it from too; naming it here registers it for
# every test file (use it with pytestmark = pytest.mark.usefixtures("one_thread")).
__all__ = ["one_thread", "fresh_process_group", "runs_code", "checkpoint8"]


@pytest.fixture
def fresh_process_group():
    """``main`` joins a one-process group and wraps ``print``; undo both after the test."""
    saved_print = builtins.print
    yield
    if utils.is_dist_avail_and_initialized():
        torch.distributed.destroy_process_group()
    builtins.print = saved_print


class RunsCode:
    """Unpickling this calls os.system (it touches ``marker``): a hostile checkpoint or ground-truth file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def runs_code():
    """The class of hostile objects: ``runs_code(marker_path)``."""
    return RunsCode


@pytest.fixture(scope="session")
def checkpoint8(tmp_path_factory) -> str:
    """A vit_tiny/8 checkpoint in the DINO training layout (``write_dino_checkpoint``: a random teacher, a NaN
    student), written once for the session."""
    return write_dino_checkpoint(str(tmp_path_factory.mktemp("checkpoint8") / "checkpoint.pth"), patch_size=8, seed=3)
