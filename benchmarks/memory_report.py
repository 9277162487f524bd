"""Peak memory of the benchmark process: host RSS and, on a GPU/TPU, the devices' allocator peak."""

import resource

import jax


def memory_report() -> str:
    parts = [f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"]
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            parts.append(f"{d.platform}:{d.id} peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    return "; ".join(parts)
