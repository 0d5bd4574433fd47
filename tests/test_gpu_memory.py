"""A trial's GPU memory: a trial given a fraction of a GPU is capped at that fraction, and a trial's
cached blocks go back to the device when it ends (a reused actor keeps its process). No GPU here: the
torch.cuda calls are recorded instead of made (the fault needs a GPU to happen for real)."""

import torch

from sweeps.tune.trial import limit_gpu_memory, release_gpu_memory


def test_a_fractional_trial_is_capped_and_every_trial_releases_its_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share: calls.append(("cap", share)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("release",)))
    for share in (0.5, 0.25, 1.0, 2.0, 0.0):  # whole GPUs and CPU trials are not capped
        limit_gpu_memory(share)
    release_gpu_memory()
    assert calls == [("cap", 0.5), ("cap", 0.25), ("release",)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    limit_gpu_memory(0.5)
    release_gpu_memory()
    assert len(calls) == 3  # nothing on a machine without CUDA
