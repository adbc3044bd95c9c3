"""Where training and prediction run: the device, the processes torchrun started, mixed precision,
and how many CPU workers each process may use.

Written for the machines people train on, most of which this code is never tested on directly:

* CUDA: bf16 autocast only where the GPU has bf16 units (compute capability 8.0+, Ampere and
  newer). `torch.cuda.is_bf16_supported()` also counts emulation, which on a T4 or RTX 20xx (7.5)
  is slow or fails in cuDNN convolutions; there fp16 with a gradient scaler is the right choice.
* Apple MPS: no float64 at all, no pinned memory; nothing here puts a float64 tensor on a device,
  and pinned memory / non_blocking copies are used on CUDA only. Mixed precision stays off on MPS.
* Several processes (torchrun): everything that depends on the machine (free memory, free disk)
  is decided on rank 0 and broadcast, so every rank takes the same path and the collectives match.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .config import FinetuneError

# How long ranks may wait for rank 0 to scan the images (all the others wait in a collective).
# The default process-group timeout (10 minutes) would kill a large training before it starts.
SCAN_WAIT = timedelta(hours=int(os.environ.get("FINETUNE_SCAN_WAIT_HOURS", "6")))


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


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Distributed:
    """This process's place among the processes torchrun started (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

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
        """Create the process group (NCCL on GPUs, gloo otherwise) and a gloo group with a long
        timeout, used only while rank 0 scans the images and the others wait for the result."""
        if not self.enabled or dist.is_initialized():
            return
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
        self._patient = dist.new_group(backend="gloo", timeout=SCAN_WAIT)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def broadcast(self, value, patient: bool = False):
        """Rank 0's value on every rank. `patient`: the others may wait up to SCAN_WAIT for it."""
        if not self.enabled:
            return value
        holder = [value]
        group = getattr(self, "_patient", None) if patient else None
        dist.broadcast_object_list(
            holder, src=0, group=group, device=None if group is not None else self._collective_device()
        )
        return holder[0]

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
