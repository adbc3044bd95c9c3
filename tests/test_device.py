"""finetune.device: the choices made for GPUs this machine does not have, simulated on the CPU."""

from __future__ import annotations

import contextlib
import os
import types

import pytest
import torch

from finetune import device as dev
from finetune.config import FinetuneError


def test_turing_gets_fp16_with_a_scaler_and_ampere_bf16(monkeypatch):
    gpus = {0: (7, 5), 1: (8, 0)}
    asked = []
    monkeypatch.setattr(
        torch.cuda,
        "get_device_capability",
        lambda d=None: asked.append(torch.device(d).index) or gpus[torch.device(d).index],
    )
    current = {}

    @contextlib.contextmanager
    def on_device(d):
        current["index"] = torch.device(d).index
        yield

    monkeypatch.setattr(torch.cuda, "device", on_device)
    # emulation counts by default: True even on a T4 (7.5); only the native answer tells them apart
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or gpus[current["index"]][0] >= 8,
    )
    dtype, why = dev.amp_choice(torch.device("cuda", 0))
    assert dtype == torch.float16 and "7.5" in why and "scaler" in why
    assert dev.amp_choice(torch.device("cuda", 1))[0] == torch.bfloat16
    assert asked == [0, 1], "the capability of the device that will run, not of the current one"
    assert dev.amp_choice(torch.device("cuda", 1), enabled=False)[0] is None
    assert dev.amp_choice(torch.device("cpu"))[0] is None and dev.amp_choice(torch.device("mps"))[0] is None

    from finetune.training import uses_grad_scaler

    assert uses_grad_scaler(torch.float16) and not uses_grad_scaler(torch.bfloat16) and not uses_grad_scaler(None)


def test_pinned_memory_and_async_copies_only_on_cuda():
    for name, expected in (("cuda", True), ("mps", False), ("cpu", False)):
        assert dev.pin_memory(torch.device(name)) is expected
        assert dev.non_blocking(torch.device(name)) is expected
    assert not dev.channels_last_for(torch.device("mps")) and dev.channels_last_for(torch.device("cpu"))


def test_more_torchrun_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ctx = dev.Distributed(rank=2, world_size=4, local_rank=2, local_world_size=4)
    with pytest.raises(FinetuneError, match="torchrun started 4 processes on this machine but only 2 GPU"):
        dev.resolve_device("auto", ctx)
    assert dev.resolve_device("auto", dev.Distributed(1, 2, 1, 2)) == torch.device("cuda", 1)
    with pytest.raises(FinetuneError, match="only 2 CUDA device"):
        dev.resolve_device("cuda:5")


def test_workers_and_threads_are_shared_by_the_local_processes(monkeypatch):
    monkeypatch.setattr(dev, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert dev.cores_per_process() == 2
    assert dev.default_workers(torch.device("cuda")) == 2 and dev.decode_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dev.default_workers(torch.device("cuda")) == 8
    # torch's threads on the CPU under torchrun: its OMP_NUM_THREADS=1 gives way to the share of the cores,
    # a larger one (the user's own) is kept
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert dev.cpu_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dev.cpu_threads() == 3


def test_waits_on_the_store_name_the_rank_its_node_and_what_rank_0_said():
    """Without a process group: two ranks' Distributed over one in-process store."""
    import re
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.HashStore()
    main, other = dev.Distributed(0, 2, 0, 2), dev.Distributed(1, 2, 1, 2)
    main._store = other._store = store
    where = re.escape(f"rank 1 on {socket.gethostname()}")
    with pytest.raises(FinetuneError, match=f"{where} waited 0.05 s for rank 0 to finish scanning: set FINETUNE_SCAN"):
        other.wait_for_main("scanning", timeout=timedelta(milliseconds=50))
    main.wait_for_main("scanning")
    # rank 0's failure reaches the others as their own one line, at once
    main.wait_for_main("reading last.pth", failure="runs/a/last.pth is not a checkpoint finetune wrote")
    with pytest.raises(FinetuneError, match="^rank 0 failed while reading last.pth: runs/a/last.pth is not a"):
        other.wait_for_main("reading last.pth", timeout=timedelta(seconds=5))
    assert main.share_from_main({"device": "cuda"}, "choosing the device") == {"device": "cuda"}
    assert other.share_from_main({"device": "cpu"}, "choosing the device") == {"device": "cuda"}
    with pytest.raises(
        FinetuneError, match=f"{where} waited 0.05 s for every rank to finish caching \\(1 of 2 did\\): set"
    ):
        other.patient_barrier("caching", timeout=timedelta(milliseconds=50))


def a_gpu_with(monkeypatch, free_bytes: dict) -> None:
    """One CUDA GPU as torch would report it, with free_bytes["now"] free (nothing ever goes to it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes["now"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_inference_leaves_the_gpu_to_a_training_and_to_short_memory(monkeypatch):
    free = {"now": 40 * 2**30}
    a_gpu_with(monkeypatch, free)
    gpu = torch.device("cuda", 0)
    assert dev.inference_device("auto") == dev.InferenceDevice(gpu)
    busy = dev.inference_device("auto", busy="20250101-resnet50-last")
    assert busy.device == torch.device("cpu") and busy.cause == "training 20250101-resnet50-last"
    assert busy.note == "the GPU is busy with training 20250101-resnet50-last; predicting on the CPU"
    assert dev.inference_device("cuda", busy="r1").device == gpu, "a device the user names is kept"
    free["now"] = dev.INFERENCE_GPU_MARGIN_BYTES - 1
    short = dev.inference_device("auto", doing="computing the image features")
    assert short.device == torch.device("cpu") and short.cause == "memory"
    assert "GiB free" in short.note and short.note.endswith("computing the image features on the CPU")
    free["now"] = dev.INFERENCE_GPU_MARGIN_BYTES
    assert dev.inference_device("auto").device == gpu

    def broken(device=None):
        raise RuntimeError("CUDA error: unknown error")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert dev.inference_device("auto").device == torch.device("cpu")


def test_the_studio_predicts_on_the_cpu_while_any_training_here_holds_the_gpu(tmp_path, monkeypatch):
    """Its own training, or one from a terminal or torchrun in its runs folder (their lock), and says so once."""
    from finetune import rundir
    from finetune.studio.state import Studio

    free = {"now": 40 * 2**30}
    a_gpu_with(monkeypatch, free)
    studio = Studio(tmp_path / "runs", tmp_path / "ws", tmp_path, base_dir=tmp_path)
    assert studio.prediction_device() == "cuda:0" and studio.device_notes.take() is None
    with rundir.TrainingLock(studio.runs_dir, tmp_path) as lock:  # a terminal's training, still scanning
        for _ in range(2):
            assert studio.prediction_device() == "cpu"
        note = f"the GPU is busy with training pid {os.getpid()}; predicting on the CPU"
        assert studio.device_notes.take() == note and studio.device_notes.take() is None, "said once"
        lock.set_run(studio.runs_dir / "from-a-terminal")
        choice = studio.inference_choice("computing the image features")
        assert choice.note == "the GPU is busy with training from-a-terminal; computing the image features on the CPU"
    assert studio.prediction_device() == "cuda:0"
    studio.job = types.SimpleNamespace(running=lambda: True, run_dir=studio.runs_dir / "the-studios-own")
    assert studio.prediction_device() == "cpu" and "the-studios-own" in studio.device_notes.take()
    studio.job = None
    free["now"] = 2**30
    assert studio.prediction_device() == "cpu" and "GiB free" in studio.device_notes.take()
