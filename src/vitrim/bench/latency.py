"""Measured latency: median and spread over many runs after warm-up, at a fixed thread count.

Models that are compared are timed *interleaved* (:func:`interleaved_latency`): one loop of
rounds, each round running every model once in a rotating order, so a burst of load from
another process lands on all of them alike and every speed-up is the ratio of the medians that
are reported. Each figure carries a ``stable`` flag: False when the runs spread widely or when
other processes used the CPU while timing.

The default thread count (:func:`default_threads`) is the number of cores this process may run
on minus the cores other processes keep busy, sampled from ``/proc/stat`` just before timing:
more threads than free cores make every OpenMP barrier wait for a thread that is not running.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vitrim.errors import ConfigError

Runner = Callable[[torch.Tensor], Any]

SPREAD_LIMIT = 1.5  # p90/p10 above this marks a figure unstable (idle runs here stay below ~1.25)
BUSY_LIMIT = 0.25  # cores used by other processes beyond those our threads leave free: unstable
LOAD_SAMPLE_S = 0.15  # how long default_threads() watches the CPU
MIN_LOAD_WINDOW_S = 0.2  # shorter timing windows are too coarse for /proc/stat's 10 ms ticks


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: leave the count as it is)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"thread count must be positive, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- load on the CPUs ------------------------------------------------------------------------


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: Sequence[int]) -> int | None:
    """Busy (non-idle, non-iowait) clock ticks summed over ``cpus``; None without ``/proc/stat``."""
    wanted = {f"cpu{i}" for i in cpus}
    total, seen = 0, 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name not in wanted:
                    continue
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                total += user + nice + system + irq + softirq + steal
                seen += 1
    except (OSError, ValueError):
        return None
    return total if seen == len(wanted) else None


class LoadProbe:
    """CPU time that *other* processes spend on this process's cores between ``start`` and ``stop``.

    Busy ticks of the cores (``/proc/stat``) minus this process's own CPU time, per second of
    wall time: 1.0 means one core was kept busy by someone else. ``None`` where ``/proc/stat``
    is missing (not Linux) or the window is too short to tell.
    """

    def __init__(self) -> None:
        self.cpus = usable_cores()
        self._ticks = self._own = self._wall = None

    def start(self) -> "LoadProbe":
        self._ticks = _busy_ticks(self.cpus)
        self._own, self._wall = time.process_time(), time.perf_counter()
        return self

    def stop(self, min_window: float = MIN_LOAD_WINDOW_S) -> float | None:
        ticks, own, wall = _busy_ticks(self.cpus), time.process_time(), time.perf_counter()
        elapsed = wall - self._wall
        if ticks is None or self._ticks is None or elapsed < min_window:
            return None
        others = (ticks - self._ticks) / _ticks_per_second() - (own - self._own)
        return max(0.0, others / elapsed)


def _ticks_per_second() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def busy_cores(seconds: float = LOAD_SAMPLE_S) -> float | None:
    """Cores kept busy by other processes over the next ``seconds`` (None: cannot tell here)."""
    probe = LoadProbe().start()
    time.sleep(seconds)
    return probe.stop(min_window=0.0)


# --- thread policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count used for timing, and why."""

    threads: int
    policy: str  # "fixed" (asked for), "free-cores" (cores minus busy cores) or "all-cores" (no load data)
    cores: int
    busy_cores: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threads(threads: int | None = None) -> ThreadChoice:
    """``threads`` when given, else the cores this process may use minus those others keep busy."""
    cores = len(usable_cores())
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"thread count must be positive, got {threads}; pass --threads 1 or more")
        return ThreadChoice(threads, "fixed", cores)
    busy = busy_cores()
    if busy is None:
        return ThreadChoice(cores, "all-cores", cores)
    free = max(1, min(cores, cores - math.floor(busy + 0.5)))
    return ThreadChoice(free, "free-cores", cores, round(busy, 2))


def default_threads() -> int:
    """The thread count used when none is given: free cores (all cores minus busy ones), at least 1."""
    return choose_threads(None).threads


# --- timing --------------------------------------------------------------------------------------


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[0], q[-1]


class _Clock:
    """Milliseconds of one call on ``device``: wall time on the CPU; on CUDA, CUDA events around the
    call and a synchronisation after it, so queued kernels are counted."""

    def __init__(self, device: torch.device | None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return float(start.elapsed_time(end))
        from vitrim.device import synchronize

        t0 = time.perf_counter()
        fn()
        if self.device is not None:
            synchronize(self.device)  # MPS queues kernels too
        return (time.perf_counter() - t0) * 1000.0

    def settle(self) -> None:
        """Wait for the warm-up's kernels before timing starts."""
        if self.device is not None:
            from vitrim.device import synchronize

            synchronize(self.device)


def time_callable(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 30,
                  min_seconds: float = 0.0, device: torch.device | str | None = None) -> dict[str, float]:
    """Milliseconds per call: median, 10th/90th percentile, runs made.

    ``device``: where ``fn`` runs its kernels (``None``: the CPU); on CUDA each call is timed
    with CUDA events and a synchronisation, after the warm-up."""
    _check_counts(warmup, runs)
    clock = _Clock(torch.device(device) if isinstance(device, str) else device)
    for _ in range(warmup):
        fn()
    clock.settle()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < runs or time.perf_counter() - started < min_seconds:
        samples.append(clock(fn))
    median, p10, p90 = _percentiles(samples)
    return {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "runs": len(samples)}


def _check_counts(warmup: int, runs: int) -> None:
    if warmup < 0 or runs < 1:
        raise ConfigError(f"need warmup >= 0 and runs >= 1, got {warmup} and {runs}")


def example_input(model: Any, batch_size: int) -> torch.Tensor:
    """Seeded random images of ``model.config``'s input shape: ``(B, C, S, S)``."""
    cfg = model.config
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    return torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size,
                       generator=torch.Generator().manual_seed(0))


def _rounds(runners: Mapping[str, Runner], inputs: Mapping[str, torch.Tensor], warmup: int, runs: int,
            min_seconds: float) -> tuple[dict[str, list[float]], float | None]:
    """Milliseconds per call of every runner over alternating rounds, and the others' CPU load."""
    names = list(runners)
    clocks = {name: _Clock(inputs[name].device if inputs[name].device.type != "cpu" else None) for name in names}
    for _ in range(warmup):
        for name in names:
            runners[name](inputs[name])
    for clock in clocks.values():
        clock.settle()
    samples: dict[str, list[float]] = {name: [] for name in names}
    probe = LoadProbe().start()
    started = time.perf_counter()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        r = 0
        while r < runs or time.perf_counter() - started < min_seconds:
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:  # rotating order: no runner always follows another
                fn, x = runners[name], inputs[name]
                samples[name].append(clocks[name](lambda: fn(x)))
            r += 1
    finally:
        if gc_was_on:
            gc.enable()
    return samples, probe.stop()


def _stats(samples: list[float], batch: int, load: float | None, cores: int, threads: int,
           spread_limit: float) -> dict[str, Any]:
    median, p10, p90 = _percentiles(samples)
    spread = p90 / p10 if p10 > 0 else math.inf
    reasons = []
    if load is not None and load > max(0, cores - threads) + BUSY_LIMIT:  # they competed for our cores
        reasons.append(f"other processes kept {load:.1f} of {cores} cores busy while timing with {threads} "
                       f"thread(s)")
    if spread > spread_limit:
        reasons.append(f"runs spread widely (p90/p10 = {spread:.2f} > {spread_limit:g})")
    return {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "runs": len(samples),
            "images_per_s": batch * 1000.0 / median, "spread": spread, "busy_cores": load,
            "stable": not reasons, "unstable_reason": "; ".join(reasons) or None}


def unstable_warning(figures: Iterable[tuple[str, Any, Mapping[str, Any]]]) -> str:
    """A warning block naming each unstable ``(name, batch, stats)`` figure and its cause; "" if none."""
    lines = [f"  {name} b={batch}: {stats['unstable_reason']}" for name, batch, stats in figures
             if stats.get("stable") is False]
    if not lines:
        return ""
    return "\n* unstable latency (re-run on an idle machine or with fewer --threads):\n" + "\n".join(lines)


def _as_runner(runner: Runner | nn.Module, device: torch.device | None = None) -> Runner:
    if isinstance(runner, nn.Module):
        runner.eval()
        if device is not None:
            runner.to(device)
    elif device is not None and isinstance(getattr(runner, "model", None), nn.Module):
        runner.model.to(device)  # e.g. WithSetting around a torch model
    return runner


def runner_device(runner: Any) -> torch.device:
    """Where a runner takes its inputs: a torch model's device (through ``.model`` for wrappers),
    else the CPU (ONNX Runtime sessions)."""
    from vitrim.device import module_device

    return module_device(runner)


def interleaved_latency(runners: Mapping[str, Runner | nn.Module], batch_sizes: Sequence[int] = (1,), *,
                        threads: int | None = None, warmup: int = 5, runs: int = 30,
                        example: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
                        reference: str | None = None, min_seconds: float = 0.0,
                        spread_limit: float = SPREAD_LIMIT,
                        device: str | torch.device | None = None) -> dict[str, dict[int, dict[str, Any]]]:
    """Time several runners interleaved; ``{name: {batch: stats}}``.

    For each batch size every runner is warmed up, then ``runs`` rounds run each runner once, in
    an order that rotates from round to round. ``stats`` holds ``median_ms``, ``p10_ms``,
    ``p90_ms``, ``runs``, ``images_per_s``, ``spread`` (p90/p10), ``busy_cores`` (cores other
    processes used meanwhile, None if unknown), ``stable`` and ``unstable_reason`` (None when
    stable), and ``speedup``: the ``reference`` runner's median (default: the first runner's)
    divided by this one's — exactly the ratio of the reported ``median_ms``.

    Inputs: ``example`` (a tensor, or a function of the batch size), else seeded random images
    of each runner's ``config`` input shape. ``threads`` fixes torch's intra-op threads
    (None: :func:`default_threads`); an ONNX Runtime model keeps the count it was opened with.
    ``device``: where torch runners are moved (``None``: where they are); each runner's inputs go
    to its device, and on CUDA every call is timed with CUDA events and a synchronisation.
    """
    if not runners:
        raise ConfigError("give at least one model to time")
    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    _check_counts(warmup, runs)
    reference = next(iter(runners)) if reference is None else reference
    if reference not in runners:
        raise ConfigError(f"reference {reference!r} is not one of the timed models ({', '.join(runners)})")
    from vitrim.device import resolve_device

    moved = None if device is None else resolve_device(device)
    fns = {name: _as_runner(r, moved) for name, r in runners.items()}
    count = default_threads() if threads is None else threads
    cores = len(usable_cores())
    result: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in fns}
    with fixed_threads(count), torch.inference_mode():
        for batch in batch_sizes:
            inputs = {name: _example(example, fns[name], batch).to(runner_device(fns[name])) for name in fns}
            samples, load = _rounds(fns, inputs, warmup, runs, min_seconds)
            for name in fns:
                result[name][batch] = _stats(samples[name], batch, load, cores, count, spread_limit)
            base = result[reference][batch]["median_ms"]
            for name in fns:
                result[name][batch]["speedup"] = base / result[name][batch]["median_ms"]
    return result


def _example(example: torch.Tensor | Callable[[int], torch.Tensor] | None, runner: Any,
             batch: int) -> torch.Tensor:
    if example is None:
        return example_input(runner, batch)
    if isinstance(example, torch.Tensor):
        return example
    return example(batch)


def measure_latency(model: nn.Module, batch_size: int = 1, *, threads: int | None = None,
                    warmup: int = 5, runs: int = 30, device: str | torch.device | None = None) -> dict[str, Any]:
    """Forward latency of ``model`` on random images of the model's input shape (on ``device``:
    ``None`` is where the model is)."""
    entry = interleaved_latency({"model": model}, [batch_size], threads=threads, warmup=warmup,
                                runs=runs, device=device)["model"][batch_size]
    entry.pop("speedup")
    return entry


def paired_latency(first: nn.Module, second: nn.Module, batch_size: int = 1, *, threads: int | None = None,
                   warmup: int = 5, runs: int = 30, min_seconds: float = 0.0,
                   device: str | torch.device | None = None) -> dict[str, Any]:
    """Median latency of two models timed alternately in one loop (drift hits both alike), for
    ``runs`` rounds and ``min_seconds`` at least.

    ``speedup`` is ``first_ms / second_ms``; ``first_spread`` / ``second_spread`` are each model's
    p90/p10 over the runs; ``stable`` is False when either figure is unstable.
    """
    x = example_input(first, batch_size)
    timed = interleaved_latency({"first": first, "second": second}, [batch_size], threads=threads,
                                warmup=warmup, runs=runs, min_seconds=min_seconds, example=x, device=device)
    a, b = timed["first"][batch_size], timed["second"][batch_size]
    reasons = sorted({r for r in (a["unstable_reason"], b["unstable_reason"]) if r})
    return {"first_ms": a["median_ms"], "second_ms": b["median_ms"], "speedup": b["speedup"], "runs": a["runs"],
            "first_spread": a["spread"], "second_spread": b["spread"],
            "stable": a["stable"] and b["stable"], "unstable_reason": "; ".join(reasons) or None}


class WithSetting:
    """A runner that sets attributes of ``model`` (e.g. a token knob) before each call, so one
    model serves several settings in :func:`interleaved_latency`."""

    def __init__(self, model: Any, **settings: Any) -> None:
        self.model, self.settings = model, settings
        if isinstance(model, nn.Module):
            model.eval()

    @property
    def config(self) -> Any:
        return self.model.config

    def apply(self) -> None:
        """Set the settings on the model."""
        for name, value in self.settings.items():
            setattr(self.model, name, value)

    def __call__(self, x: torch.Tensor) -> Any:
        self.apply()
        return self.model(x)


__all__ = ["LoadProbe", "SPREAD_LIMIT", "ThreadChoice", "WithSetting", "busy_cores", "choose_threads",
           "default_threads", "example_input", "fixed_threads", "interleaved_latency", "measure_latency", "paired_latency",
           "runner_device", "time_callable", "usable_cores"]
