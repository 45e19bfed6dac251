"""Fixtures shared by several test files."""
import builtins

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
