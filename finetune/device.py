"""Where training and prediction run: the device, the processes torchrun started, mixed precision,
and how many CPU workers each process may use.

Written for the machines people train on, most of which this code is never tested on directly:

* CUDA: bf16 autocast only where the GPU has bf16 units (compute capability 8.0+, Ampere and
  newer). `torch.cuda.is_bf16_supported()` also counts emulation, which on a T4 or RTX 20xx (7.5)
  is slow or fails in cuDNN convolutions; there fp16 with a gradient scaler is the right choice.
* Apple MPS: no float64 at all, no pinned memory; nothing here puts a float64 tensor on a device,
  and pinned memory / non_blocking copies are used on CUDA only. Mixed precision stays off on MPS.
* Several processes (torchrun), on one machine or several: what depends on the machine (free
  memory, free disk, the dataset's files) is measured on every rank and settled over all of them
  (the smallest budget, every rank able to read), so every rank takes the same path and the
  collectives match. Long work on one rank (rank 0's scan, a cache) is waited for on torchrun's
  TCP key-value store, never in a collective, whose timeout (NCCL's watchdog: 10 minutes) it would
  exceed; no second process group is made, so nothing binds to the address of gethostname()
  (loopback on many hosts) and no GLOO_SOCKET_IFNAME is needed beside NCCL.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import platform
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .config import FinetuneError

# How long ranks may wait for one another's long work: rank 0's scan of the images, the slowest rank's
# cache. The default process-group timeout (10 minutes) would kill a large training before it starts.
SCAN_WAIT = timedelta(hours=int(os.environ.get("FINETUNE_SCAN_WAIT_HOURS", "6")))

T = TypeVar("T")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. under taskset or a container), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def local_world_size() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE), 1 without torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1))


def cores_per_process() -> int:
    """This process's share of the cores: 8 GPUs on 16 cores leave 2 cores per training process."""
    return max(1, usable_cores() // local_world_size())


def cpu_threads() -> int:
    """torch's threads for one training process on the CPU under torchrun: its share of the cores.
    torchrun sets OMP_NUM_THREADS=1 for every process it starts when none is set, which leaves all but
    a core or two idle; a larger OMP_NUM_THREADS can only be the user's own and is kept."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 1:
        return int(given)
    return cores_per_process()


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Distributed:
    """This process's place among the processes torchrun started (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    # the key-value store every rank reaches (torchrun's TCPStore), under a prefix of this run's; and
    # how many waits on it this process has made (every rank makes the same ones, in the same order)
    _store: dist.Store | None = field(default=None, init=False, repr=False, compare=False)
    _base_store: dist.Store | None = field(default=None, init=False, repr=False, compare=False)
    _waits: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), local_world_size())

    def init(self, device: torch.device) -> None:
        """Create the process group: NCCL on GPUs, gloo otherwise, on the store of `connect`. Every rank
        must train on the same kind of device (one backend), checked first: a mix would hang here."""
        if not self.enabled or dist.is_initialized():
            return
        main_type = self.share_from_main(device.type, "choosing the device")
        if device.type != main_type:
            raise FinetuneError(
                f"rank {self.rank} on {socket.gethostname()} would train on {device.type} but rank 0 on "
                f"{main_type}: give every node the same --device"
            )
        # under this training's prefix: a second training in the same processes (--resume after a
        # training, a notebook) must not find the first group's addresses (their ports are closed)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore("default_pg", self.connect()),
            rank=self.rank,
            world_size=self.world_size,
            device_id=device if device.type == "cuda" else None,
        )

    def connect(self) -> dist.Store:
        """The store every rank reaches, found as init_process_group("env://") finds it (MASTER_ADDR and
        MASTER_PORT; torchrun's agent store when it serves them), under a prefix of this training's.
        Usable before the process group exists (rank 0's resumed configuration travels in it)."""
        if self._store is None:
            if dist.is_initialized():  # a process group made elsewhere (a notebook, a test): its store
                base = dist.distributed_c10d._get_default_store()
            else:
                base, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size))
            # keys of their own for each torchrun restart (--max-restarts) and each training in this
            # process (the counter is per rank: every rank counts the same trainings)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            generation = base.add(f"finetune/{attempt}/trainings/{self.rank}", 1)
            self._base_store = base
            self._store = dist.PrefixStore(f"finetune/{attempt}/{generation}", base)
        return self._store

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
        self._store = self._base_store = None

    def broadcast(self, value, patient: bool = False):
        """Rank 0's value on every rank. `patient`: rank 0 may come after long work; the others wait for
        it on the store (up to SCAN_WAIT), not in the collective."""
        if not self.enabled:
            return value
        if patient:
            self.wait_for_main("its work")
        holder = [value]
        dist.broadcast_object_list(holder, src=0, device=self._collective_device())
        return holder[0]

    def from_main(self, compute: Callable[[], T], what: str) -> T:
        """compute() on rank 0, its result on every rank (in one broadcast). The others wait for it on the
        store, up to SCAN_WAIT, and when it fails on rank 0 they fail too, with its one-line error: not
        after a collective's timeout, nor when torchrun gets round to stopping them."""
        if not self.enabled:
            return compute()
        value = None
        if self.is_main:
            try:
                value = compute()
            except BaseException as error:
                failure = str(error) if isinstance(error, FinetuneError) else f"{type(error).__name__}: {error}"
                with contextlib.suppress(Exception):  # the others then stop with torchrun
                    self.wait_for_main(what, failure=failure)
                raise
        self.wait_for_main(what)
        return self.broadcast(value)

    def share_from_main(self, value: T, what: str) -> T:
        """Rank 0's `value` (small, picklable) on every rank through the store; needs no process group."""
        if not self.enabled:
            return value
        key = self._next_key(what)
        store = self.connect()
        if self.is_main:
            store.set(key, pickle.dumps(value))  # type: ignore[arg-type]  # typed str; bytes pass as they are
            return value
        self._await(key, f"rank 0 to finish {what}", SCAN_WAIT)
        return pickle.loads(store.get(key))

    def wait_for_main(self, what: str, failure: str | None = None, timeout: timedelta = SCAN_WAIT) -> None:
        """Rank 0 says it is done with `what` (or failed, and why); the others wait for that on the store,
        up to `timeout`, polling (no collective and its timeout; signals are handled meanwhile), and
        raise rank 0's failure as a FinetuneError of their own."""
        if not self.enabled:
            return
        key = self._next_key(what)
        store = self.connect()
        if self.is_main:
            store.set(key, "failed:" + failure if failure is not None else "done")
            return
        self._await(key, f"rank 0 to finish {what}", timeout)
        said = store.get(key).decode(errors="replace")
        if said.startswith("failed:"):
            raise FinetuneError(f"rank 0 failed while {what}: {said.removeprefix('failed:')}")

    def patient_barrier(self, what: str, timeout: timedelta = SCAN_WAIT) -> None:
        """Every rank returns once all have come here, after up to `timeout` (not a collective's 10
        minutes): the end of work whose length differs between ranks, such as building a cache."""
        if not self.enabled:
            return
        key = self._next_key(what)
        store = self.connect()
        if store.add(f"{key}/arrived", 1) == self.world_size:
            store.set(f"{key}/all", "1")

        def whom() -> str:
            return f"every rank to finish {what} ({store.add(f'{key}/arrived', 0)} of {self.world_size} did)"

        self._await(f"{key}/all", whom, timeout)

    def _next_key(self, what: str) -> str:
        self._waits += 1
        return f"{self._waits}:{what}"

    def _await(self, key: str, whom: str | Callable[[], str], timeout: timedelta) -> None:
        """Until the store holds `key`: short polls, no blocking wait (a TCPStore logs a warning for each
        wait that times out), so a long wait costs a request per second and Ctrl-C still works."""
        store = self.connect()
        deadline = time.monotonic() + timeout.total_seconds()
        pause = 0.01
        while not self._holds(store, key, whom):
            left = deadline - time.monotonic()
            if left <= 0:
                raise FinetuneError(
                    f"rank {self.rank} on {socket.gethostname()} waited {_duration(timeout)} for "
                    f"{whom() if callable(whom) else whom}: "
                    f"set FINETUNE_SCAN_WAIT_HOURS to wait longer"
                )
            time.sleep(min(pause, left))
            pause = min(1.0, pause * 2)

    def _holds(self, store: dist.Store, key: str, whom: str | Callable[[], str]) -> bool:
        try:
            return store.check([key])
        except dist.DistError as error:  # the store's host (torchrun on rank 0's node) has gone
            first = (str(error).splitlines() or [""])[0]
            raise FinetuneError(
                f"rank {self.rank} on {socket.gethostname()} lost touch with the other ranks while waiting for "
                f"{whom if isinstance(whom, str) else 'them'}: {first}"
            ) from None

    def all_gather(self, value) -> list:
        """Every rank's value, in rank order (small picklable values)."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank says True (a Ctrl-C on one stops all together)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._collective_device())
        dist.all_reduce(tensor)
        return bool(tensor.item() > 0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks; float64 only on the CPU (gloo), float32 on a GPU."""
        if not self.enabled:
            return values
        device = self._collective_device()
        tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.cpu().tolist()]

    def broadcast_module_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, so that the model that is
        validated on every rank is the model rank 0 saves."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    @staticmethod
    def _collective_device() -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )


def _duration(wait: timedelta) -> str:
    seconds = wait.total_seconds()
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


# ---------------------------------------------------------------------------------------------
# Devices


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str, ctx: Distributed | None = None) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' -> a torch.device that exists here (clear error if not).

    Under torchrun each process takes the GPU of its local rank."""
    ctx = ctx or Distributed()
    if name == "auto":
        if torch.cuda.is_available():
            return _cuda_for_rank(name, ctx, 0)
        if mps_available() and not ctx.enabled:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"device {name!r} requested but CUDA is not available here")
        return _cuda_for_rank(name, ctx, device.index or 0)
    if device.type == "mps":
        if not mps_available():
            raise FinetuneError("device 'mps' requested but Apple MPS is not available here")
        if ctx.enabled:
            raise FinetuneError("several processes on Apple MPS are not supported: run without torchrun")
    elif device.type != "cpu":
        raise FinetuneError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def _cuda_for_rank(name: str, ctx: Distributed, index: int) -> torch.device:
    count = torch.cuda.device_count()
    if ctx.enabled:
        if ctx.local_world_size > count or ctx.local_rank >= count:
            raise FinetuneError(
                f"torchrun started {ctx.local_world_size} processes on this machine but only {count} GPU(s) "
                f"are visible: use --nproc_per_node {count} (one process per GPU), or --device cpu"
            )
        index = ctx.local_rank
    if index >= count:
        raise FinetuneError(f"device {name!r}: only {count} CUDA device(s) visible")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index or 0}, compute capability {major}.{minor})"
    if device.type == "mps":
        return "Apple GPU (mps)"
    return f"CPU ({usable_cores()} cores)"


def amp_choice(device: torch.device, enabled: bool = True) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None, why) for this device: bf16 on GPUs with bf16 hardware, else fp16
    (with a gradient scaler in training), none on the CPU and MPS."""
    if not enabled:
        return None, "float32: mixed precision turned off (--no-amp)"
    if device.type != "cuda":
        return None, f"float32 on {device.type}: mixed precision is used on CUDA only"
    major, minor = torch.cuda.get_device_capability(device)
    with torch.cuda.device(device):
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if major >= 8 and native_bf16:
        return torch.bfloat16, f"bf16: compute capability {major}.{minor} has bf16 units"
    return torch.float16, (
        f"fp16 with a gradient scaler: compute capability {major}.{minor} has no bf16 units "
        f"(emulated bf16 would be slow)"
    )


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    return amp_choice(device, enabled)[0]


def pin_memory(device: torch.device) -> bool:
    """Pinned host memory speeds up copies to a CUDA GPU; MPS and the CPU gain nothing from it."""
    return device.type == "cuda"


def non_blocking(device: torch.device) -> bool:
    """Asynchronous host-to-device copies: safe with pinned memory on CUDA only."""
    return device.type == "cuda"


def channels_last_for(device: torch.device, wanted: bool = True) -> bool:
    """channels_last: faster convolutions on CUDA (tensor cores) and on x86 CPUs (oneDNN, ~1.4x for a
    resnet50 batch); on MPS it is not a win and some kernels fall back, so it stays off there."""
    return wanted and device.type in ("cuda", "cpu")


def default_workers(device: torch.device) -> int:
    """DataLoader worker processes for one training process, from its share of the cores."""
    cores = cores_per_process()
    return min(8, cores) if device.type == "cuda" else min(4, max(0, cores - 1))


def decode_threads() -> int:
    """Threads for parallel decoding in one process (PIL releases the GIL), from its share of the cores."""
    return min(16, cores_per_process())


def release_gpu_memory() -> None:
    """Give cached GPU memory back (before a training starts in another process)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if mps_available():
        torch.mps.empty_cache()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict:
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------------------------
# Predicting beside a training

# What predicting (or the data doctor's features, or a Grad-CAM) needs free on a GPU before the
# studio puts a model there: this process's CUDA context on its first use of the GPU (0.3-0.5 GB),
# ResNet-50's weights and their fp16 copies under autocast (0.15 GB), the activations of a 64-image
# batch at 224 px (about 5 MB per image at the widest layers: 0.3 GB) and cuDNN's workspace: about
# 1.2 GB, plus headroom for a larger image size or Grad-CAM's backward pass. Below it the prediction
# would fail, or take from a training the memory it allocates as it goes.
INFERENCE_GPU_MARGIN_BYTES = int(1.5 * 2**30)


@dataclass(frozen=True)
class InferenceDevice:
    """Where to predict, and when it is not the GPU that 'auto' means here, why (`note`, one line for
    the UI or the log) and a stable `cause` ("training NAME", "memory"), so it is said once."""

    device: torch.device
    note: str | None = None
    cause: str | None = None


def inference_device(
    requested: str = "auto",
    busy: str | None = None,
    doing: str = "predicting",
    need_bytes: int = INFERENCE_GPU_MARGIN_BYTES,
) -> InferenceDevice:
    """The device for inference beside trainings. A named device is the user's choice and is kept;
    'auto' means the CPU while `busy` (the name of a training running on this machine: its GPU and
    its memory are the training's) or while the GPU has less than `need_bytes` free (another
    program's training, or any other), and the GPU otherwise. The busy check comes first: it
    creates no CUDA context in this process, which would itself take memory from the training."""
    device = resolve_device(requested)
    if requested != "auto" or device.type == "cpu":
        return InferenceDevice(device)
    cpu = torch.device("cpu")
    if busy:
        return InferenceDevice(cpu, f"the GPU is busy with training {busy}; {doing} on the CPU", f"training {busy}")
    if device.type != "cuda":
        return InferenceDevice(device)  # MPS shares the machine's memory: nothing to measure apart
    try:
        free = gpu_free_bytes(device)
    except RuntimeError as error:  # a GPU whose driver cannot answer will not run a model either
        return InferenceDevice(cpu, f"cannot read the GPU's free memory ({error}); {doing} on the CPU", "memory")
    if free < need_bytes:
        return InferenceDevice(
            cpu,
            f"the GPU has {free / 2**30:.1f} GiB free, less than the {need_bytes / 2**30:.1f} GiB that "
            f"{doing} needs (another program holds it); {doing} on the CPU",
            "memory",
        )
    return InferenceDevice(device)


def gpu_free_bytes(device: torch.device) -> int:
    """Memory this process may still take on `device`: what the driver reports free (every process
    counted) plus what this process's caching allocator holds reserved but unused (ours to reuse)."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
