"""Fixtures shared by several test files."""
import builtins
import os

import pytest
import torch

import utils


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
