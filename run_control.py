"""Run control of ``patch_wise_dino.py``: checkpoints, resuming, and stopping every process together.

``RunControl`` is what the training script calls; it guarantees:

- **atomic checkpoints**: ``checkpoint.pth`` is replaced in one step (``utils.atomic_save``), the file it
  replaces stays as ``checkpoint.prev.pth``; when ``checkpoint.pth`` cannot be read (truncated, corrupt), the
  run continues from ``checkpoint.prev.pth`` with a warning instead of starting over; a checkpoint of
  another model or refused as unsafe stops the run;
- **an agreed stopping point**: SIGTERM/SIGINT (or data workers gone with the signal), and any other
  ``stop_signals`` a launcher adds (``run_with_submitit.py``: submitit's preemption signal), only set a flag;
  before each step all processes agree whether to stop, so they stop at the same iteration, after a
  checkpoint, and agree on the signals that stopped them (``RunControl.stopped_by``);
- **bit-identical resume** on the same hardware and thread count: a checkpoint inside an epoch holds the
  samples done and every process's generator states (torch, CUDA, numpy, ``random``); the sampler skips the
  samples done without decoding them, and each image's crops depend on (--seed, epoch, index) only; with
  another number of processes or batch size the epoch goes on with the images it had not seen;
- ``log.txt`` holds one line per finished epoch: a resumed run drops the lines of the epochs it redoes.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
from typing import Any, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

import utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pth", "checkpoint.prev.pth"


# ----------------------------------------------------------------------------------------------------
# Signals, seeds and the sampler
# ----------------------------------------------------------------------------------------------------
class StopFlag:
    """While active (``with``), the signals in ``signals`` only record themselves: the last in ``signum``,
    every one in ``received``."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signum, self.signals, self.received = 0, tuple(signals), set()
        self._previous: dict = {}

    def _record(self, signum: int, frame) -> None:
        self.signum = signum
        self.received.add(signum)

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            self._previous = {signum: signal.signal(signum, self._record) for signum in self.signals}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class ResumePoint(NamedTuple):
    """Where a run continues: in ``epoch``, after ``samples_done`` of its samples (all processes together)."""
    epoch: int = 0
    samples_done: int = 0
    rng: Optional[dict] = None  # this process's generator states at that point; None: seed afresh
    meters: Optional[list] = None  # [printed, diagnostics] {name: [total, count]} of the epoch so far
    bad_images: int = 0  # images skipped so far in the epoch, all processes


def sum_over_processes(value: int, device: torch.device) -> int:
    """Sum of an integer over all processes; a collective that every process must call."""
    if utils.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def epoch_seed(seed: int, epoch: int, rank: int, samples_done: int = 0) -> int:
    """The seed of the model's randomness (stochastic depth) in ``epoch`` on ``rank``; ``samples_done``
    when an epoch resumes in its middle without the saved generator states."""
    return int(np.random.SeedSequence([seed, epoch, rank] + ([samples_done] if samples_done else []))
               .generate_state(1)[0])


class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler``'s shuffled, padded order, split over the processes, that can begin an epoch
    after its first ``start`` samples (counted over all processes together), so a resumed epoch skips what
    was done without decoding it. Yields ``(index, seed)``: an image's crops depend on (--seed, epoch,
    index) only. With ``start`` 0 the indices are those of ``DistributedSampler``."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * math.ceil(self.total_size / len(order)))[:self.total_size]  # padded as DistributedSampler
        rest = order[self.start:]
        if rest:
            rest = (rest * math.ceil(len(self) * self.num_replicas / len(rest)))[:len(self) * self.num_replicas]
        for index in rest[self.rank::self.num_replicas]:
            yield index, item_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return math.ceil(max(self.total_size - self.start, 0) / self.num_replicas)


def worker_init(worker_id: int, rank: int) -> None:
    """Seed numpy and ``random`` of a data worker from its torch seed and the rank; let it keep freed memory
    (``utils.keep_freed_memory``: its per-image temporaries reuse mapped pages).

    Ctrl-C (SIGINT to the whole process group) is left to the training process, which stops after its
    checkpoint and then shuts the workers down. On SIGTERM (the DataLoader's or multiprocessing's shutdown,
    or a scheduler stopping every process of the job) a worker leaves at once with status 0: a worker
    killed by the signal would make the DataLoader raise in the training process wherever it is, before the
    checkpoint is written."""
    seed = np.random.SeedSequence([torch.initial_seed(), rank, worker_id]).generate_state(2)
    np.random.seed(int(seed[0]))
    random.seed(int(seed[1]))
    utils.keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_quietly)


def _leave_quietly(signum: int, frame) -> None:
    os._exit(0)


def rng_states() -> dict:
    """This process's torch (CPU, current CUDA device), numpy and ``random`` generator states as tensors and
    numbers, which ``weights_only=True`` loads."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(key.astype(np.int64)),
              "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
              "python": torch.tensor(internal, dtype=torch.int64), "python_version": version,
              "python_gauss": gauss_next}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    np.random.set_state(("MT19937", states["numpy_key"].numpy().astype(np.uint32), states["numpy_pos"],
                         *states["numpy_gauss"]))
    random.setstate((states["python_version"], tuple(states["python"].tolist()), states["python_gauss"]))


def gather_rng_states() -> list:
    """Every process's ``rng_states()`` in rank order; a collective."""
    if utils.get_world_size() == 1:
        return [rng_states()]
    states = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(states, rng_states())
    return states


# ----------------------------------------------------------------------------------------------------
# Output folder, checkpoint files and log lines
# ----------------------------------------------------------------------------------------------------
def prepare_output_dir(path: str) -> None:
    """Create ``path`` and check that a file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as exc:
        raise utils.UserError(f"--output_dir {path} is not a writable folder ({exc.strerror or exc}): "
                              f"choose another --output_dir") from None


def load_run_checkpoint(args: argparse.Namespace, same_settings: Sequence[str]) -> tuple:
    """``(checkpoint, path, corrupt)`` of the run in ``output_dir`` to continue, or ``(None, "", None)`` for a
    new run.

    When ``checkpoint.pth`` cannot be read (truncated, corrupt), ``checkpoint.prev.pth`` is used with a
    warning and ``corrupt`` names the bad file (to be moved away); when neither can be read the run stops
    rather than start over. A checkpoint refused as unsafe stops the run (it is intact: falling back would
    lose its progress). A checkpoint whose ``same_settings`` differ from this run's is refused."""
    path, previous = (os.path.join(args.output_dir, name) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))
    problems = []
    for candidate in (path, previous):
        if not os.path.isfile(candidate):
            continue
        try:
            checkpoint = utils.load_checkpoint(candidate)
        except utils.CheckpointRefused:
            raise
        except utils.UserError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(checkpoint, dict) or not {"student", "teacher", "optimizer", "epoch"} <= set(checkpoint):
            problems.append(f"{candidate} is not a Patch-Wise DINO training checkpoint")
            continue
        check_same_settings(args, checkpoint, candidate, same_settings)
        if candidate == previous:
            print(f"WARNING: {problems[0] if problems else path + ' is missing'}; resuming from the previous "
                  f"checkpoint {previous}", file=sys.stderr, flush=True)
        return checkpoint, candidate, (path if problems and os.path.isfile(path) else None)
    if problems:
        raise utils.UserError(f"cannot continue the run in {args.output_dir}: {'; '.join(problems)}; to start a new "
                              f"run, move these files out of {args.output_dir} or pass another --output_dir")
    return None, "", None


def describe_checkpoint(path: str, checkpoint: dict) -> str:
    """``"PATH (epoch E, iteration I)"``: where a run continues from that checkpoint, for messages."""
    return f"{path} (epoch {checkpoint['epoch']}, iteration {checkpoint.get('iteration', 0)})"


def check_same_settings(args: argparse.Namespace, checkpoint: dict, path: str, names: Sequence[str]) -> None:
    """Refuse to continue a run whose ``names`` settings (model, optimizer) differ from this run's."""
    saved = checkpoint.get("args")
    if not isinstance(saved, argparse.Namespace):
        return
    differences = [f"--{name} {getattr(saved, name)} (this run: {getattr(args, name)})" for name in names
                   if hasattr(saved, name) and getattr(saved, name) != getattr(args, name)]
    if differences:
        raise utils.UserError(f"{path} was trained with {', '.join(differences)}: pass the same settings to "
                              f"continue that run, or another --output_dir for a new one")


def drop_log_lines_from(output_dir: str, epoch: int) -> None:
    """Keep only the ``log.txt`` lines of epochs before ``epoch``: a resumed run writes the later ones again."""
    path = os.path.join(output_dir, "log.txt")
    if not utils.is_main_process() or not os.path.isfile(path):
        return

    def earlier(line: str) -> bool:
        try:
            return json.loads(line)["epoch"] < epoch
        except (ValueError, TypeError, KeyError):
            return True  # not a line of ours: keep it

    with open(path) as f:
        lines = f.readlines()
    # a last line without its newline was cut off while being appended: dropped, or the next line would join it
    kept = [line for line in lines if earlier(line) and line.endswith("\n")]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def check_same_start(start: ResumePoint, checkpoint_path: Optional[str], device: torch.device) -> None:
    """Refuse to train when the processes resumed from different points (each node read its own
    --output_dir, e.g. a node-local disk): they would train different models in lockstep. A collective."""
    if utils.get_world_size() == 1:
        return
    mine = torch.tensor([start.epoch, start.samples_done], dtype=torch.int64, device=device)
    first = mine.clone()
    torch.distributed.broadcast(first, 0)
    if sum_over_processes(int(not torch.equal(mine, first)), device):
        raise utils.UserError(f"the processes resume from different points (here: epoch {start.epoch}, sample "
                              f"{start.samples_done} from {checkpoint_path or 'no checkpoint'}; rank 0: epoch "
                              f"{int(first[0])}, sample {int(first[1])}): --output_dir must be one folder that "
                              f"every node shares")


def until_stopped(batches: Iterator, stop: StopFlag) -> Iterator:
    """The items of ``batches``, then None in place of an error if a stop signal has arrived (data workers
    that got the signal too are gone: the iteration cannot be fetched, but a checkpoint can be written)."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception:
            if not stop.signum:
                raise
            yield None
            return
        yield item


class NonFiniteLoss(utils.UserError):
    """The loss is NaN or infinite (in any process: it is all-reduced first)."""

    def __init__(self, value: float, epoch: int):
        super().__init__(f"the loss is {value} at epoch {epoch}: training stopped before this update")
        self.value = value


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
class RunControl:
    """Checkpoints, resume and the agreed stop of one training run (see the module docstring).

    ``parts`` names what a checkpoint holds besides ``epoch`` and ``args``: objects with ``state_dict`` /
    ``load_state_dict`` (student, teacher, optimizer, loss, scaler; None entries are skipped).
    ``same_settings``: argument names a continued run must share with the checkpoint.
    ``stop_signals``: the signals that stop the run at an agreed point; after such a stop, ``stopped_by``
    holds those that any process received (the same in every process).
    Use (``patch_wise_dino.py`` has the full loop)::

        run = RunControl(args, same_settings=("arch", "patch_size"))
        run.load()  # early: a checkpoint of another model is refused before any work
        start = run.restore({"student": student, "teacher": teacher, "optimizer": optimizer})
        with run:  # stop signals now only set a flag
            for epoch in range(start.epoch, args.epochs):
                first, batches = run.start_epoch(epoch, loader, meters)
                for it, item in enumerate(batches, start=first):
                    if run.should_stop(item):  # all processes agree
                        run.save_in_epoch(epoch, it, meters)
                        run.report_stop(f"epoch {epoch}, iteration {it}")
                        break
                    batch = run.batch_to_train(item, epoch, it)
                    ...  # train on batch unless it is None
                    if run.checkpoint_due(it + 1, first + len(loader)):
                        run.save_in_epoch(epoch, it + 1, meters)
                else:
                    run.finish_epoch()
                if run.stopped or not run.end_epoch(epoch, log_stats):
                    break
    """

    def __init__(self, args: argparse.Namespace, same_settings: Sequence[str],
                 stop_signals: Sequence[int] = STOP_SIGNALS):
        self.args, self.same_settings = args, tuple(same_settings)
        self.stop = StopFlag(stop_signals)
        self.parts: Dict[str, Any] = {}
        self.checkpoint: Optional[dict] = None
        self.checkpoint_path = ""
        self.start = ResumePoint()
        self.last_checkpoint = "none (nothing was saved yet)"
        self.position = (0, 0)  # (epoch, iteration) of the step running, named in error messages
        self.resume = ResumePoint()  # where the current epoch began
        self.stopped, self.bad_images, self.epoch_bad_images = False, 0, 0
        self.stopped_by: tuple = ()  # after an agreed stop: the stop signals any process received

    def __enter__(self) -> "RunControl":
        self.stop.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.__exit__(*exc_info)

    def load(self) -> None:
        """Read the checkpoint of the run in ``--output_dir`` (if any); remove half-written files."""
        self.checkpoint, self.checkpoint_path, corrupt = load_run_checkpoint(self.args, self.same_settings)
        if utils.get_world_size() > 1:  # every process has read the files (each node may read its own --output_dir)
            torch.distributed.barrier()  # before they are cleaned up
        if utils.is_main_process():
            if corrupt is not None:
                os.replace(corrupt, corrupt + ".corrupt")
            utils.remove_partial_writes(self.args.output_dir, "checkpoint")  # checkpoint.pth, .prev, NNNN
        if self.checkpoint is not None:
            self.last_checkpoint = describe_checkpoint(self.checkpoint_path, self.checkpoint)

    def restore(self, parts: Dict[str, Any]) -> ResumePoint:
        """Load ``parts`` from the checkpoint read by ``load`` and return where the run continues (all
        processes must agree); trims ``log.txt`` to the epochs before it."""
        self.parts = parts
        if self.checkpoint is not None:
            self.start = self._restore_parts(self.checkpoint, self.checkpoint_path)
        self.checkpoint = None  # the weights are in the models now: free the copy
        check_same_start(self.start, self.checkpoint_path, self.args.device)
        drop_log_lines_from(self.args.output_dir, self.start.epoch)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restarts:
            print(f"torchrun restart {restarts}: continuing from the last checkpoint")
        shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and shared_store:
            print("WARNING: with torchrun's shared rendezvous store, restarted workers can find the addresses of the "
                  "dead ones and fail to connect (pytorch/pytorch#135712): launch with "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=...", file=sys.stderr)
        return self.start

    def _restore_parts(self, checkpoint: dict, path: str) -> ResumePoint:
        args = self.args
        try:
            for name, part in self.parts.items():
                if part is not None and name in checkpoint:
                    part.load_state_dict(checkpoint[name])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise utils.UserError(f"cannot resume from {path}, written with other settings "
                                  f"({str(exc).strip().splitlines()[0][:200]}): pass the settings of that run or "
                                  f"another --output_dir") from None
        epoch, iteration = int(checkpoint["epoch"]), int(checkpoint.get("iteration", 0))
        samples_done = int(checkpoint.get("samples_done", iteration * args.total_batch))
        print(f"Resuming from {path}: epoch {epoch}, iteration {iteration}")
        if not samples_done:  # the start of the epoch
            return ResumePoint(epoch)
        rng = checkpoint.get("rng") or []
        same_layout = (checkpoint.get("world_size") == args.world_size == len(rng) and
                       getattr(checkpoint.get("args"), "batch_size_per_gpu", None) == args.batch_size_per_gpu)
        if not same_layout:
            print(f"Note: {path} was written with another number of processes or batch size: epoch {epoch} goes "
                  f"on with the images it had not seen, but not bit-identically to an uninterrupted run")
        return ResumePoint(epoch, samples_done, rng[args.rank] if same_layout else None,
                           checkpoint.get("epoch_meters"), int(checkpoint.get("bad_images", 0)))

    def save(self, epoch: int, progress: Optional[dict] = None, archive: Optional[int] = None) -> str:
        """Write ``output_dir/checkpoint.pth`` (rank 0) and return ``"PATH (epoch E, iteration I)"``.

        DINO's layout: student (DDP keys), teacher, optimizer, ``epoch`` (the one to run next), args, center
        (``dino_loss``), scaler; plus ``iteration`` (done in ``epoch``) and ``world_size``. A checkpoint
        inside an epoch adds ``progress``: samples done, every process's generator states, the epoch's meter
        sums and skipped images. ``archive``: also keep a copy as ``checkpoint{archive:04}.pth``."""
        checkpoint = {name: part.state_dict() for name, part in self.parts.items() if part is not None}
        checkpoint.update({"epoch": epoch, "args": self.args, "iteration": 0, "world_size": self.args.world_size,
                           **(progress or {})})
        path = os.path.join(self.args.output_dir, CHECKPOINT)
        if utils.is_main_process():
            utils.atomic_save(checkpoint, path, previous=os.path.join(self.args.output_dir, PREVIOUS_CHECKPOINT))
            if archive is not None:
                utils.atomic_save(checkpoint, os.path.join(self.args.output_dir, f"checkpoint{archive:04}.pth"))
        self.last_checkpoint = describe_checkpoint(path, checkpoint)
        return self.last_checkpoint

    def start_epoch(self, epoch: int, loader: torch.utils.data.DataLoader,
                    meters: Sequence[utils.MetricLogger]) -> Tuple[int, Iterator]:
        """Prepare ``epoch``: its sampler skips the samples a resumed epoch had done, its random state is set
        (the generator states saved with those samples, else a seed of (--seed, epoch, rank)), ``meters`` get
        the sums saved with them. Returns the first iteration to run and the epoch's batches, which end early
        (with None) when a stop signal has taken the data workers down."""
        args = self.args
        self.resume = self.start if epoch == self.start.epoch else ResumePoint(epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.set_start(self.resume.samples_done)
        batches = iter(loader)  # making it draws the data workers' base seed from torch's generator: seed after
        if self.resume.rng is not None:
            set_rng_states(self.resume.rng)
        else:
            torch.manual_seed(epoch_seed(args.seed, epoch, args.rank, self.resume.samples_done))
        for logger, saved in zip(meters, self.resume.meters or ()):
            for name, (value_sum, count) in saved.items():
                logger.meters[name].total, logger.meters[name].count = float(value_sum), int(count)
        self.epoch_bad_images = self.resume.bad_images if utils.is_main_process() else 0
        return self.resume.samples_done // args.total_batch, until_stopped(batches, self.stop)

    def should_stop(self, item: Optional[tuple]) -> bool:
        """Whether the processes stop before this step: any of them received a stop signal or lost its data
        workers to one (``item`` None). A collective: every process calls it before every step."""
        return bool(sum_over_processes(int(item is None or self.stop.signum != 0), self.args.device))

    def batch_to_train(self, item: tuple, epoch: int, it: int) -> Optional[Any]:
        """The batch of ``item`` = (batch, images skipped), or None when some process has no image left in its
        batch (``--skip_bad_images``: every process skips the step). A collective with --skip_bad_images."""
        batch, skipped = item
        self.epoch_bad_images += skipped
        if self.args.skip_bad_images and sum_over_processes(int(batch is None), self.args.device):
            return None
        self.position = (epoch, it)
        return batch

    def checkpoint_due(self, done: int, total: int) -> bool:
        """Whether a checkpoint inside the epoch is due after ``done`` of its ``total`` iterations
        (every --saveckp_iters; the epoch's end writes its own)."""
        every = self.args.saveckp_iters
        return bool(every) and done % every == 0 and done < total

    def save_in_epoch(self, epoch: int, done: int, meters: Sequence[utils.MetricLogger]) -> str:
        """``save`` after ``done`` iterations of ``epoch``, with what an exact resume needs: samples done, every
        process's generator states, the meters' sums, the images skipped. A collective."""
        first = self.resume.samples_done // self.args.total_batch
        sums = [{name: [m.total, m.count] for name, m in logger.meters.items()} for logger in meters]
        return self.save(epoch, {
            "iteration": done, "rng": gather_rng_states(), "epoch_meters": sums,
            "samples_done": self.resume.samples_done + (done - first) * self.args.total_batch,
            "bad_images": sum_over_processes(self.epoch_bad_images, self.args.device)})

    def finish_epoch(self) -> int:
        """After the epoch's last step: the images skipped in it by all processes (a collective)."""
        self.bad_images = sum_over_processes(self.epoch_bad_images, self.args.device)
        return self.bad_images

    def end_epoch(self, epoch: int, log_stats: dict) -> bool:
        """Append the epoch's ``log.txt`` line and write its checkpoint; False when the run must stop here
        (a stop signal arrived during the epoch's last steps)."""
        args = self.args
        # The log line goes first: a run stopped between the two redoes the epoch and rewrites its line.
        utils.append_json_log(args.output_dir, {**log_stats, "epoch": epoch, "bad_images": self.bad_images})
        archive = epoch if args.saveckp_freq and epoch % args.saveckp_freq == 0 else None
        self.save(epoch + 1, archive=archive)
        if sum_over_processes(int(self.stop.signum != 0), args.device) and epoch + 1 < args.epochs:
            self.report_stop(f"epoch {epoch}")
            return False
        return True

    def report_stop(self, where: str) -> None:
        """Mark the run stopped and say where and how to continue (a collective)."""
        self.stopped = True
        self.stopped_by = tuple(signum for signum in self.stop.signals
                                if sum_over_processes(int(signum in self.stop.received), self.args.device))
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal to another process"
        print(f"Stopped by {name} after {where}: checkpoint saved to {self.last_checkpoint}; run the same "
              f"command to continue from there", flush=True)

    @contextlib.contextmanager
    def failures_explained(self) -> Iterator[None]:
        """Turn a non-finite loss and a killed data worker into one-line errors naming the last checkpoint."""
        try:
            yield
        except NonFiniteLoss as exc:
            epoch, it = self.position
            raise utils.UserError(
                f"the loss is {exc.value} at epoch {epoch}, iteration {it}: training stopped; the last checkpoint "
                f"is {self.last_checkpoint} (continue from it with a lower --lr, --clip_grad, or --use_fp16 false; "
                f"if the loss is again not finite at the same iteration, its weights had already diverged: copy "
                f"checkpoint.prev.pth over checkpoint.pth and continue from that)") from None
        except RuntimeError as exc:  # raised wherever the main thread is when torch learns a worker died
            if "DataLoader worker (pid" not in str(exc):
                raise
            raise utils.UserError(f"{str(exc).strip().splitlines()[0].strip()} (out of memory?): lower "
                                  f"--num_workers and run the same command to continue from the last checkpoint, "
                                  f"{self.last_checkpoint}") from None
