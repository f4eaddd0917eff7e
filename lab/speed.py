"""--benchmark's report: where the time of a training step goes, against the least time the step's
matrix products alone take (the product floor), the peak memory, and the time of each measurement
after training.
"""
import math
import os
import sys
import time

import numpy as np

from autograd import Linear

from lab import analysis


def matmul_floor(mlps, batch_size, dtype, reps=50):
    """Seconds per training step spent in the matrix products of these MLPs alone (the same shapes,
    timed here), and their FLOP count. For each Linear, W (n_in, n_out): forward x W, backward x^T
    dy and dy W^T (except for the very first layer, whose input is data)."""
    rng = np.random.default_rng(0)
    linears = [layer for mlp in mlps for layer in mlp.layers if isinstance(layer, Linear)]
    work = []
    for i, layer in enumerate(linears):
        w = layer.params["W"].copy()
        x = rng.random((batch_size, w.shape[0]), dtype=dtype)
        work.append({"x": x, "w": w, "needs_dx": i > 0})
    flops = 0
    for item in work:
        products = 3 if item["needs_dx"] else 2
        flops += 2 * batch_size * item["w"].size * products
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for item in work:
            y = item["x"] @ item["w"]               # forward
            item["x"].T @ y                         # dL/dW (y stands in for dy: the same shape)
            if item["needs_dx"]:
                y @ item["w"].T                     # dL/dx
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), flops


def time_steps(model, opt, make_batch, n_steps, beta):
    """The median seconds of each phase of up to 100 training steps (make_batch(step) -> x, eps)."""
    phases = {"batching": [], "forward": [], "backward": [], "adam": []}
    grads = model.grads()
    for step in range(min(100, n_steps)):
        t0 = time.perf_counter()
        x, eps = make_batch(step)
        t1 = time.perf_counter()
        model.forward(x, eps)
        t2 = time.perf_counter()
        model.backward(beta)
        t3 = time.perf_counter()
        opt.step(grads)
        t4 = time.perf_counter()
        phases["batching"].append(t1 - t0)
        phases["forward"].append(t2 - t1)
        phases["backward"].append(t3 - t2)
        phases["adam"].append(t4 - t3)
    return {name: float(np.median(times)) for name, times in phases.items()}


def speed(model, opt, make_batch, x_train, x_test, cfg, state, args):
    """--benchmark, after a few epochs of training: the median epoch; the median time of each phase
    of a step; the product floor, timed in the same run; the peak memory of the process; and the
    phases of the analysis after training."""
    n_images = len(x_train)
    n_steps = math.ceil(n_images / cfg["batch_size"])
    phases = time_steps(model, opt, make_batch, n_steps, cfg["beta"])
    floor_s, flops = matmul_floor([model.encoder, model.decoder], cfg["batch_size"], model.dtype)
    epoch_s = float(np.median(state["epoch_seconds"]))
    floor_epoch = floor_s * n_steps
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    print(f"benchmark: {n_images} images, batch {cfg['batch_size']}, {model.dtype}, "
          f"{os.cpu_count()} cores, OPENBLAS_NUM_THREADS={threads}")
    print(f"median epoch {epoch_s:.3f} s = {n_images / epoch_s:,.0f} examples/s")
    step_parts = ", ".join(f"{name} {1e3 * seconds:.3f} ms" for name, seconds in phases.items())
    print(f"per step (median of {min(100, n_steps)}): {step_parts}")
    print(f"matrix products alone (same shapes, this run): {1e3 * floor_s:.3f} ms/step = "
          f"{floor_epoch:.3f} s/epoch, {flops * n_steps / 1e9:.0f} GFLOP/epoch at "
          f"{flops / floor_s / 1e9:.0f} GFLOP/s")
    print(f"epoch / floor = {epoch_s / floor_epoch:.2f}; outside the matrix products: "
          f"{epoch_s - floor_epoch:.3f} s/epoch (elementwise work, optimizer, batching)")
    peak = peak_memory_mb()
    if peak:
        print(f"peak memory (max RSS of this process): {peak:.0f} MB")
    else:
        print("peak memory (max RSS of this process): not reported on this platform")
    metrics, _ = analysis.analyze(model, x_train, x_test, cfg["seed"], args.iw_samples,
                                  args.gmm_components, args.gmm_covariance, log=lambda line: None)
    seconds = metrics["analysis_seconds"]
    print("analysis after training: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))


def peak_memory_mb():
    """The most memory this process has held (max resident set size), in MB, where the platform
    reports it."""
    try:
        import resource
    except ImportError:                     # Windows: the peak working set, through the Win32 API
        if os.name == "nt":
            return windows_peak_memory_mb()
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return peak / 2 ** 20               # bytes on macOS
    return peak / 2 ** 10                   # KiB on Linux


def windows_peak_memory_mb():
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):       # PROCESS_MEMORY_COUNTERS, as far as PeakWorkingSetSize
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("rest", ctypes.c_size_t * 7)]

    counters = Counters(cb=ctypes.sizeof(Counters))
    process = ctypes.windll.kernel32.GetCurrentProcess()
    ok = ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb)
    if ok:
        return counters.PeakWorkingSetSize / 2 ** 20
    return None
