"""finetune.syncs: what makes the host wait for the device is counted, pure tensor math is not."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from finetune import syncs
from finetune.syncs import count_syncs, cuda_sync_debug


def test_reads_of_a_value_are_counted_and_tensor_math_is_not():
    x = torch.randn(8)
    with count_syncs() as seen:
        y = (x * 2 + 1).relu().sum()
        assert seen.count == 0
        y.item()
        bool(x[0] > 0)
        float(y)
        x[x > 0]  # a boolean mask: nonzero inside the kernel
        x.nonzero()
        x.masked_fill(x > 0, 0.0)  # the same shape out: no wait
    assert seen.by_op == {"_local_scalar_dense": 3, "index": 1, "nonzero": 1}
    assert seen.count == 5


def test_reads_under_inference_mode_are_counted():
    """There the mode sees aten.item itself (autograd's decomposition into _local_scalar_dense is skipped)."""
    with count_syncs("cpu") as seen, torch.inference_mode():
        total = torch.zeros((), dtype=torch.float64)
        total += torch.ones(3).sum().to(total.dtype)
        float(total.item())
        bool(total > 0)
    assert seen.count == 2


def test_nested_counters_both_count_and_the_mode_is_gone_after_an_error():
    x = torch.ones(())
    with pytest.raises(RuntimeError, match="boom"), count_syncs() as outer:
        x.item()
        with count_syncs() as inner:
            x.item()
        raise RuntimeError("boom")
    assert (outer.count, inner.count) == (2, 1)
    assert _get_current_dispatch_mode() is None
    with count_syncs():
        pass
    x.item()
    assert outer.count == 2


def test_the_optimizers_host_side_step_is_not_a_sync():
    """torch keeps AdamW's step on the CPU (non-fused) so that reading it never waits for a GPU."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    optimizer = torch.optim.AdamW(params)
    with count_syncs("cpu") as seen:
        for _ in range(3):
            sum((p**2).sum() for p in params).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert seen.count == 0


def test_only_the_given_devices_tensors_count():
    with count_syncs("cuda") as seen:  # host tensors on a GPU machine: no wait
        torch.ones(()).item()
        torch.ones(3).nonzero()
    assert seen.count == 0


def test_cuda_sync_debug_is_a_no_op_off_cuda():
    with cuda_sync_debug("cpu") as warned:
        torch.ones(()).item()
    assert not warned.active and warned.count == 0


def test_cuda_sync_debug_counts_torchs_warnings_and_restores_the_mode(monkeypatch):
    """Simulated: torch's warn mode as TORCH_WARN raises it (a UserWarning with this text)."""
    modes = ["default"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.raises(ValueError), warnings.catch_warnings(record=True) as passed_on:
        warnings.simplefilter("always")
        with cuda_sync_debug("cuda") as warned:
            for _ in range(2):
                warnings.warn(syncs.CUDA_SYNC_WARNING, UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
            raise ValueError
    assert modes == ["default", "warn", 0]  # on, then the previous mode back, despite the error
    assert warned.active and warned.count == 2 and len(warned.recorded) == 2
    assert [str(w.message) for w in passed_on] == ["something else"]


def test_syncs_inside_allowed_functions_are_counted_apart():
    def progress_read(t: torch.Tensor) -> float:
        return t.item()

    x = torch.ones(())
    with count_syncs(allow=[progress_read]) as seen:
        progress_read(x)
        x.item()
    assert (seen.count, seen.allowed) == (1, 1)


def test_what_the_dataloader_does_on_the_host_is_not_a_sync():
    """workers=0: the dataset runs in this thread, on host tensors (in worker processes on a GPU)."""
    from torch.utils.data import DataLoader

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((2,), float(torch.tensor(i).item()))

    with count_syncs("cpu") as seen:
        for batch in DataLoader(Rows(), batch_size=2):
            batch.sum()
    assert seen.count == 0
