"""What the torch backend's depth path does on its device: graph breaks, host syncs, SDPA kernels, kernel time.

Read by ``depthvlm bench`` (``--compile``) and ``scripts/gpu_bench_4b.py`` (the profiled 4B frame):

- graph breaks: ``torch._dynamo``'s own count since the last :func:`reset_counts` (0 means the compiled
  depth forward is one graph);
- host syncs: a ``torch.profiler`` count of the CUDA runtime calls after which the host waits for the
  device (:data:`SYNC_CALLS`); on a CPU there is no device to wait for, so none is counted;
- which scaled-dot-product-attention kernel ran, and the device time per stage, from the same profile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

#: CUDA runtime calls that block the host until the device is done (names as the profiler records them).
SYNC_CALLS = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                        "cudaMemcpy2D"})
#: Substrings of SDPA kernel names -> the SDPA backend that ran them (first match wins).
SDPA_KERNELS = (("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "efficient"), ("efficient", "efficient"),
                ("_scaled_dot_product_attention_math", "math"))
#: Why a CPU run reports no host-sync count.
NO_SYNC_COUNT_ON_CPU = "host syncs are counted on CUDA only (a profiler count of CUDA runtime calls that wait)"


def reset_counts() -> None:
    """Forget torch._dynamo's counters (graph breaks, graphs) before the compile being measured."""
    from torch._dynamo.utils import counters

    counters.clear()


def graph_breaks() -> int:
    """Graph breaks torch._dynamo met since :func:`reset_counts` (summed over their reasons)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def compiled_graphs() -> int:
    """Graphs torch._dynamo compiled since :func:`reset_counts`."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def count_host_syncs(names: Iterable[str]) -> int:
    """How many of the profiled call ``names`` block the host (:data:`SYNC_CALLS`)."""
    return sum(1 for name in names if name in SYNC_CALLS)


def sdpa_backends(kernel_names: Iterable[str]) -> list[str]:
    """The SDPA backends (cudnn, flash, efficient, math) whose kernels appear in ``kernel_names``, sorted."""
    found = set()
    for name in kernel_names:
        lowered = name.lower()
        for part, backend in SDPA_KERNELS:
            if part in lowered:
                found.add(backend)
                break
    return sorted(found)


@dataclass
class FrameProfile:
    """One profiled run of frames on CUDA."""

    frames: int
    host_syncs_per_frame: float
    sdpa_backends: list[str]
    device_ms_per_stage: dict[str, float] = field(default_factory=dict)  # per frame, from record_function ranges


def profile_frames(run_frame: Callable[[], object], frames: int = 1) -> FrameProfile:
    """Profile ``frames`` calls of ``run_frame`` on CUDA (host syncs, SDPA kernels, device time per stage).

    Stage ranges are whatever ``torch.profiler.record_function`` ranges the frame opens (the torch backend
    opens ``vision``, ``llm``, ``head`` when timed stage by stage); their device time is per frame, ms.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(frames):
            run_frame()
        torch.cuda.synchronize()
    events = prof.key_averages()
    names = [e.key for e in events for _ in range(e.count)]
    stages = {e.key: e.device_time_total / 1e3 / frames for e in events if e.key in ("vision", "llm", "head")}
    return FrameProfile(frames=frames, host_syncs_per_frame=count_host_syncs(names) / frames,
                        sdpa_backends=sdpa_backends(e.key for e in events), device_ms_per_stage=stages)
