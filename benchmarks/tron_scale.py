"""TRON's monitor alone, at 1k / 10k / 100k simulated agents beating once per second
(interval 1 s, miss_threshold 3 => beat_timeout 3 s; progress and task deadlines far away).

Four measurements, all on ``tron.common.monitor`` as it is (nothing is patched):

  cpu       FakeClock, no thread: each agent beats once per simulated second at its own
            phase (a random but fixed order, spread evenly over the second), ``tick(now)``
            between seconds. CPU time (thread_time) inside ``Monitor.beat`` per call and
            inside ``tick`` per call / per heap entry popped; a no-op function called the
            same way gives the loop's own cost, subtracted as "net". cProfile once at the
            largest size.
  memory    a fresh process per size: RSS growth (psutil) and tracemalloc of a Monitor
            holding N agents in steady state, and the heap size ``len(m._queue)``.
  realtime  the real MonitorThread on the monotonic clock; a driver thread beats every agent
            once per second (spread evenly); after a warm-up a random sample of 100 agents
            stops beating. For each alert as delivered to the sink: ``fired_at - deadline``
            (lateness) and sink receive time - ``fired_at`` (delivery). The driver's own lag
            (beat sent - beat scheduled) is reported so real misses can be told apart.
  busy      10k agents for --busy-seconds while os.cpu_count() processes spin on pure CPU;
            alerts for agents that never stopped are false alarms (target 0). A sample of
            100 is stopped 5 s before the end to also show lateness under load.

    .venv/bin/python -m benchmarks.tron_scale [--sizes 1000,10000,100000] [--busy-seconds 60]
                                           [--json benchmarks/results/tron_scale.json]

Targets compared against: 100k agents with < 20 us of monitor work per beat and < 200 MB;
hang detection within threshold + 50 ms at p99; zero false alarms at 10k agents for 60 s
with every core busy. The script reports; it asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from array import array
from pathlib import Path

import psutil

from tron.common.clock import FakeClock
from tron.common.monitor import Monitor, MonitorThread, Signal, Verdict
from tron.scripts.stats import summary

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 1.0
MISS_THRESHOLD = 3
BEAT_TIMEOUT = INTERVAL * MISS_THRESHOLD
FAR = 1e9  # progress / task deadlines: never
SAMPLE = 100  # agents stopped in the realtime runs
RESULTS = ROOT / "benchmarks" / "results"


# -- helpers -----------------------------------------------------------------------------------

def agents(n: int) -> tuple[list[str], list[str]]:
    return [f"agent-{i:06d}" for i in range(n)], [f"i-{i:06d}" for i in range(n)]


def table(title: str, headers: list[str], rows: list[list]) -> str:
    cells = [[h for h in headers]] + [["" if c is None else (f"{c:,.2f}" if isinstance(c, float) else
                                                               (f"{c:,}" if isinstance(c, int) else str(c)))
                                       for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = [title, "  ".join(h.rjust(w) for h, w in zip(cells[0], widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def machine() -> dict:
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                           if ln.startswith("model name")), "?"),
        "loadavg_at_start": os.getloadavg(),
        "mem_total_mb": round(psutil.virtual_memory().total / 2**20),
        "gc_enabled": gc.isenabled(),
        "switch_interval_s": sys.getswitchinterval(),
    }


def _noop(service, incarnation, seq, now, *, task_id=None, progress=None, waiting=False):
    return None


def _watch_all(m: Monitor, names, incs, now) -> None:
    for name, inc in zip(names, incs):
        m.watch(name, inc, now, beat_timeout=BEAT_TIMEOUT, progress_timeout=FAR, task_timeout=FAR)


def _schedule(n: int, rng: random.Random) -> list[tuple[str, str, float]]:
    """(service, incarnation, offset in the second), in the order the agents beat."""
    names, incs = agents(n)
    order = list(range(n))
    rng.shuffle(order)
    return [(names[i], incs[i], j * INTERVAL / n) for j, i in enumerate(order)]


# -- 1. CPU per beat and per tick (FakeClock, no thread) ------------------------------------------

def cpu_run(n: int, *, warm_s: int, measure_s: int, seed: int) -> dict:
    rng = random.Random(seed)
    pairs = _schedule(n, rng)
    clock = FakeClock(1000.0)
    m = Monitor()
    t_watch = time.thread_time_ns()
    _watch_all(m, [p[0] for p in pairs], [p[1] for p in pairs], clock.now())
    watch_ns = (time.thread_time_ns() - t_watch) / n

    # the loop's own cost: the same loop calling a no-op with the same arguments
    base_runs = []
    for _ in range(3):
        c0 = time.thread_time_ns()
        for name, inc, off in pairs:
            _noop(name, inc, 0, 1000.0 + off, task_id=None, progress=None, waiting=False)
        base_runs.append((time.thread_time_ns() - c0) / n)
    loop_ns = statistics.median(base_runs)

    beat = m.beat
    per_second, ticks = [], []
    accepted_before = m.beats_accepted
    gcp = GcPauses()
    gcp.__enter__()
    try:
        t_measure = _cpu_seconds(m, pairs, clock, beat, warm_s, measure_s, per_second, ticks, n)
    finally:
        gcp.__exit__()
    fired = sum(t.pop("fired") for t in ticks)
    young_max = max(t["young_after"] for t in ticks)
    accepted = m.beats_accepted - accepted_before
    gc_sum = gcp.summary(t_measure)
    return _cpu_result(n, measure_s, warm_s, per_second, ticks, accepted, fired, watch_ns, loop_ns, m,
                       young_max, gc_sum)


def _cpu_seconds(m, pairs, clock, beat, warm_s, measure_s, per_second, ticks, n) -> float:
    t_measure = float("inf")
    fired_warm = 0
    for s in range(warm_s + measure_s):
        if s == warm_s:
            t_measure = time.monotonic()
        base = clock.now()
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        for name, inc, off in pairs:
            beat(name, inc, s, base + off, task_id=None, progress=None, waiting=False)
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        now = clock.advance(INTERVAL)
        heap = m._queue._heap
        due = sum(1 for e in heap if e[0] <= now)  # untimed: how many entries this tick pops
        heap_before = len(heap)
        c2, w2 = time.thread_time_ns(), time.perf_counter_ns()
        signals = m.tick(now)
        c3, w3 = time.thread_time_ns(), time.perf_counter_ns()
        if s >= warm_s:
            per_second.append({"beat_cpu_ns": (c1 - c0) / n, "beat_wall_ns": (w1 - w0) / n})
            ticks.append({"cpu_ms": (c3 - c2) / 1e6, "wall_ms": (w3 - w2) / 1e6, "popped": due,
                          "heap_before": heap_before, "heap_after": len(m._queue),
                          "fired": len(signals) + fired_warm,
                          # objects in GC generation 0 now: re-armed heap entries pile up there
                          "young_after": len(gc.get_objects(0))})
            fired_warm = 0
        else:
            fired_warm += len(signals)
    return t_measure


def _cpu_result(n, measure_s, warm_s, per_second, ticks, accepted, fired, watch_ns, loop_ns, m, young_max,
                gc_sum) -> dict:
    beats = n * measure_s
    beat_cpu = [p["beat_cpu_ns"] for p in per_second]
    beat_wall = [p["beat_wall_ns"] for p in per_second]
    tick_cpu_ns = sum(t["cpu_ms"] for t in ticks) * 1e6
    popped = sum(t["popped"] for t in ticks)
    beat_cpu_total = sum(beat_cpu) * n
    return {
        "agents": n,
        "simulated_seconds_measured": measure_s,
        "beats_measured": beats,
        "beats_accepted_all": accepted,
        "expected_accepted_all": n * (warm_s + measure_s),
        "signals_fired": fired,
        "watch_ns_per_agent": round(watch_ns),
        "loop_baseline_ns": round(loop_ns),
        "beat_cpu_ns_p50": round(statistics.median(beat_cpu)),
        "beat_cpu_ns_min": round(min(beat_cpu)),
        "beat_cpu_ns_max": round(max(beat_cpu)),
        "beat_cpu_ns_net_p50": round(statistics.median(beat_cpu) - loop_ns),
        "beat_wall_ns_p50": round(statistics.median(beat_wall)),
        "ticks": len(ticks),
        "tick_cpu_ms_p50": round(statistics.median(t["cpu_ms"] for t in ticks), 3),
        "tick_cpu_ms_max": round(max(t["cpu_ms"] for t in ticks), 3),
        "tick_wall_ms_max": round(max(t["wall_ms"] for t in ticks), 3),
        "tick_entries_popped": popped,
        "tick_ns_per_popped": round(tick_cpu_ns / popped) if popped else None,
        "monitor_cpu_ns_per_beat_amortized": round((beat_cpu_total + tick_cpu_ns) / beats),
        "monitor_cpu_ns_per_beat_amortized_net": round((beat_cpu_total + tick_cpu_ns) / beats - loop_ns),
        "heap_len": len(m._queue),
        "gc_young_objects_max_after_tick": young_max,
        "gc_measured": gc_sum,
        "gc_max_pause_ms": max(v["max_ms"] for v in gc_sum.values()),
        "per_tick": ticks,
    }


def cpu_profile(n: int, *, seed: int, out_path: Path) -> dict:
    """cProfile of 3 simulated seconds at steady state (one full re-arm cycle: every
    agent's queue entry pops and is pushed on once per beat_timeout)."""
    pairs = _schedule(n, random.Random(seed))
    clock = FakeClock(1000.0)
    m = Monitor()
    _watch_all(m, [p[0] for p in pairs], [p[1] for p in pairs], clock.now())
    beat = m.beat

    def second(s: int) -> None:
        base = clock.now()
        for name, inc, off in pairs:
            beat(name, inc, s, base + off, task_id=None, progress=None, waiting=False)
        m.tick(clock.advance(INTERVAL))

    for s in range(3):  # the first cycle re-arms entries that were all queued at watch time
        second(s)
    prof = cProfile.Profile()
    prof.enable()
    for s in range(3, 3 + int(BEAT_TIMEOUT)):
        second(s)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
    st.print_stats(14)
    full = io.StringIO()
    pstats.Stats(prof, stream=full).sort_stats("cumulative").print_stats(40)
    out_path.write_text(buf.getvalue() + "\n\n==== by cumulative ====\n" + full.getvalue())
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"func": f"{file}:{line}({func})", "calls": nc, "tottime_s": round(tt, 4),
                     "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    total = sum(r["tottime_s"] for r in rows)
    return {"agents": n, "beats": n * int(BEAT_TIMEOUT), "total_s": round(total, 3), "top": rows[:14],
            "text": buf.getvalue()}


# -- 2. memory (a fresh process per size) ----------------------------------------------------------

def _mem_child(n: int, trace: bool, seed: int) -> dict:
    pairs = _schedule(n, random.Random(seed))
    names = [p[0] for p in pairs]
    incs = [p[1] for p in pairs]
    gc.collect()
    proc = psutil.Process()
    if trace:
        tracemalloc.start(1)
    gc.collect()
    rss0 = proc.memory_info().rss
    clock = FakeClock(1000.0)
    m = Monitor()
    _watch_all(m, names, incs, clock.now())
    big = 1_000_000  # seqs above the small-int cache, one int object per agent as in the daemon
    for s in range(7):  # two full re-arm cycles: steady state
        base = clock.now()
        for name, inc, off in pairs:
            m.beat(name, inc, s + big, base + off, task_id=None, progress=None, waiting=False)
        m.tick(clock.advance(INTERVAL))
    gc.collect()
    rss1 = proc.memory_info().rss
    res = {"agents": n, "trace": trace, "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
           "rss_growth_mb": (rss1 - rss0) / 2**20, "heap_len": len(m._queue), "agents_watched": len(m),
           "heap_list_bytes": sys.getsizeof(m._queue._heap)}
    if trace:
        cur, peak = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = snap.statistics("lineno")
        top = [{"where": f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}",
                "mb": round(s.size / 2**20, 2), "blocks": s.count} for s in stats[:6]]
        res.update({"traced_current_mb": cur / 2**20, "traced_peak_mb": peak / 2**20, "top_lines": top})
    return res


def memory_run(n: int, seed: int) -> dict:
    """Each measurement in a fresh interpreter (this script with --_mem-child), so that the
    heap left by earlier sizes does not hide RSS growth."""
    out = {"agents": n}
    for trace in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.tron_scale", "--_mem-child", str(n), "--seed", str(seed)]
        if trace:
            cmd.append("--_trace")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {n} failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if trace:
            out.update({k: res[k] for k in ("traced_current_mb", "traced_peak_mb", "top_lines")})
        else:
            out.update({k: res[k] for k in ("rss_before_mb", "rss_after_mb", "rss_growth_mb", "heap_len",
                                            "agents_watched", "heap_list_bytes")})
    out["bytes_per_agent_rss"] = round(out["rss_growth_mb"] * 2**20 / n)
    out["bytes_per_agent_traced"] = round(out["traced_current_mb"] * 2**20 / n)
    return out


# -- 3. realtime: the real MonitorThread, a driver thread -----------------------------------------

class Driver(threading.Thread):
    """Beats every agent once per INTERVAL, evenly spread, in a fixed random order. Wakes
    every ~1 ms and sends every beat that is due; records its own lag (sent - scheduled)."""

    def __init__(self, m: Monitor, pairs: list[tuple[str, str, float]], start_at: float) -> None:
        super().__init__(name="tron-bench-driver", daemon=True)
        self.m = m
        self.names = [p[0] for p in pairs]
        self.incs = [p[1] for p in pairs]
        self.n = len(pairs)
        self.start_at = start_at
        self.skip = bytearray(self.n)  # 1: this agent has stopped beating
        self.last = array("d", [0.0]) * self.n  # the `now` of each agent's last beat
        self.batches: list[tuple[float, float]] = []  # (time, max lag in the batch)
        self.sent = 0
        self.rejected = 0
        self._halt = False
        self.error: BaseException | None = None

    def halt(self) -> None:
        self._halt = True

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            self.error = err

    def _run(self) -> None:
        n, names, incs, skip, last = self.n, self.names, self.incs, self.skip, self.last
        beat, mono, sleep = self.m.beat, time.monotonic, time.sleep
        accepted = Verdict.ACCEPTED
        start, period = self.start_at, INTERVAL
        batches = self.batches
        k = 0
        while mono() < start:
            sleep(0.0005)
        while not self._halt:
            now = mono()
            due = int((now - start) * n / period) + 1
            if due > k:
                first_lag = now - (start + k * period / n)
                t = now
                while k < due:
                    i = k % n
                    if not skip[i]:
                        t = mono()
                        if beat(names[i], incs[i], k // n, t, task_id=None, progress=None,
                                waiting=False) is not accepted:
                            self.rejected += 1
                        last[i] = t
                        self.sent += 1
                    k += 1
                last_lag = t - (start + (k - 1) * period / n)
                batches.append((t, max(first_lag, last_lag)))
            sleep(0.001)


def _thread_cpu(native_id: int) -> float | None:
    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return None


class GcPauses:
    """Every garbage collection (and how long it held the GIL) while installed."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []  # (start, end, generation)
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.monotonic()
        else:
            self.pauses.append((self._t0, time.monotonic(), info["generation"]))

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self, since: float) -> dict:
        out = {}
        for gen in (0, 1, 2):
            ds = [(e - s) * 1e3 for s, e, g in self.pauses if g == gen and s >= since]
            out[f"gen{gen}"] = {"count": len(ds), "max_ms": round(max(ds, default=0.0), 2),
                                "total_ms": round(sum(ds), 1)}
        return out

    def overlapping(self, a: float, b: float, min_gen: int = 0) -> float:
        """Milliseconds of collection inside [a, b]."""
        return sum(max(0.0, min(e, b) - max(s, a)) for s, e, g in self.pauses if g >= min_gen) * 1e3


def realtime_run(n: int, *, seed: int, warm_s: float, stop_at_s: float, end_s: float,
                 label: str, gc_off: bool = False) -> dict:
    """Beat n agents in real time; at ``stop_at_s`` a random sample of SAMPLE agents stops;
    run until ``end_s`` (seconds after the driver starts). ``gc_off``: a diagnostic run with
    the cyclic garbage collector disabled, to show how much lateness is collection pauses."""
    rng = random.Random(seed)
    pairs = _schedule(n, rng)
    m = Monitor()
    received: list[tuple[float, Signal]] = []
    lock = threading.Lock()

    def sink(sig: Signal) -> None:
        t = time.monotonic()
        with lock:
            received.append((t, sig))

    tick_count = [0, 0]  # calls, entries fired
    real_tick = m.tick

    def counted_tick(now: float) -> list[Signal]:
        out = real_tick(now)
        tick_count[0] += 1
        tick_count[1] += len(out)
        return out

    m.tick = counted_tick  # the MonitorThread calls m.tick; count its wake-ups
    for name, inc, _ in pairs:
        m.watch(name, inc, time.monotonic(), beat_timeout=BEAT_TIMEOUT, progress_timeout=FAR, task_timeout=FAR)
    gc.collect()
    was_enabled = gc.isenabled()
    if gc_off:
        gc.disable()
    gcp = GcPauses()
    thread = MonitorThread(m, sink)
    start = time.monotonic() + 0.05
    drv = Driver(m, pairs, start)
    sample: list[int] = []
    t_stop = None
    proc = psutil.Process()
    try:
        gcp.__enter__()
        thread.start()
        drv.start()
        time.sleep(max(0.0, start + warm_s - time.monotonic()))
        cpu_proc0 = proc.cpu_times()
        cpu_mon0 = _thread_cpu(thread.native_id)
        cpu_drv0 = _thread_cpu(drv.native_id)
        ticks0 = tick_count[0]
        t_steady = time.monotonic()
        time.sleep(max(0.0, start + stop_at_s - time.monotonic()))
        sample = rng.sample(range(n), min(SAMPLE, n))
        t_stop = time.monotonic()
        for i in sample:
            drv.skip[i] = 1
        time.sleep(max(0.0, start + end_s - time.monotonic()))
        t_end = time.monotonic()
        cpu_proc1 = proc.cpu_times()
        cpu_mon1 = _thread_cpu(thread.native_id)
        cpu_drv1 = _thread_cpu(drv.native_id)
        ticks1 = tick_count[0]
    finally:
        drv.halt()
        drv.join(timeout=10)
        thread.stop()
        gcp.__exit__()
        if gc_off and was_enabled:
            gc.enable()
    if drv.error:
        raise RuntimeError(f"driver failed: {drv.error!r}")
    if drv.is_alive() or thread.is_alive():
        raise RuntimeError("driver or monitor thread did not stop")

    stopped = {pairs[i][0]: i for i in sample}
    lateness, delivery, total, bad_deadline = [], [], [], 0
    late_gc: list[float] = []  # for alerts later than 10 ms: ms of garbage collection in that gap
    false_alarms = []
    seen = set()
    for t_recv, sig in received:
        if sig.service in stopped:
            seen.add(sig.service)
            i = stopped[sig.service]
            if abs(sig.deadline - (drv.last[i] + BEAT_TIMEOUT)) > 1e-9:
                bad_deadline += 1
            lateness.append((sig.fired_at - sig.deadline) * 1e3)
            if lateness[-1] > 10.0:
                late_gc.append(gcp.overlapping(sig.deadline, sig.fired_at))
            delivery.append((t_recv - sig.fired_at) * 1e3)
            total.append((t_recv - sig.deadline) * 1e3)
        else:
            false_alarms.append({"service": sig.service, "late_by_ms": round((sig.fired_at - sig.deadline) * 1e3, 3),
                                 "reason": str(sig.reason)})
    steady = [lag * 1e3 for t, lag in drv.batches if t >= t_steady]
    slow_batches = [(t - lag, t) for t, lag in drv.batches if t >= t_steady and lag > 0.05]
    slow_with_gc = sum(1 for a, b in slow_batches if gcp.overlapping(a, b) > 0)
    all_lags = [lag * 1e3 for _, lag in drv.batches]
    window = t_end - t_steady
    mon_cpu = (cpu_mon1 - cpu_mon0) if cpu_mon0 is not None and cpu_mon1 is not None else None
    drv_cpu = (cpu_drv1 - cpu_drv0) if cpu_drv0 is not None and cpu_drv1 is not None else None
    proc_cpu = (cpu_proc1.user + cpu_proc1.system) - (cpu_proc0.user + cpu_proc0.system)

    def r(x, d=3):
        return None if x is None else round(x, d)

    late, deliv, lag = summary(lateness), summary(delivery), summary(steady)  # {} when empty

    return {
        "label": label + (", gc off" if gc_off else ""),
        "agents": n,
        "gc_disabled": gc_off,
        "sample_stopped": len(sample),
        "alerts_for_stopped": len(seen),
        "missed_stopped": len(sample) - len(seen),
        "false_alarms": len(false_alarms),
        "false_alarm_examples": false_alarms[:5],
        "deadline_mismatches": bad_deadline,
        "lateness_ms_p50": r(late.get("p50")), "lateness_ms_p99": r(late.get("p99")),
        "lateness_ms_max": r(max(lateness, default=None)),
        "delivery_ms_p50": r(deliv.get("p50")), "delivery_ms_p99": r(deliv.get("p99")),
        "delivery_ms_max": r(max(delivery, default=None)),
        "deadline_to_sink_ms_p99": r(summary(total).get("p99")),
        "driver_beats_sent": drv.sent,
        "driver_beats_rejected": drv.rejected,
        "driver_lag_ms_p50_steady": r(lag.get("p50")), "driver_lag_ms_p99_steady": r(lag.get("p99")),
        "driver_lag_ms_max_steady": r(max(steady, default=None)),
        "driver_lag_ms_max_incl_startup": r(max(all_lags, default=None)),
        "driver_batches_later_than_50ms": len(slow_batches),
        "of_which_overlapping_a_gc": slow_with_gc,
        "monitor_ticks_per_s": r((ticks1 - ticks0) / window, 1),
        "monitor_thread_cpu_pct": r(100 * mon_cpu / window if mon_cpu is not None else None, 1),
        "driver_thread_cpu_pct": r(100 * drv_cpu / window if drv_cpu is not None else None, 1),
        "process_cpu_pct": r(100 * proc_cpu / window, 1),
        "steady_window_s": r(window, 2),
        "heap_len_end": len(m._queue),
        "gc_steady": gcp.summary(t_steady),
        "alerts_later_than_10ms": len(late_gc),
        "of_which_overlapping_a_gc_pause": sum(1 for x in late_gc if x > 0),
        "gc_ms_inside_those_gaps_max": r(max(late_gc, default=None), 2),
        "t_stop_after_start_s": r(t_stop - start if t_stop else None, 2),
    }


# -- 4. false alarms with every core busy -------------------------------------------------------

SPIN = "import sys, time\nuntil = float(sys.argv[1])\nx = 0\nwhile time.time() < until:\n    x += 1\n"


def busy_run(n: int, seconds: float, *, seed: int) -> dict:
    """os.cpu_count() pure-CPU spinner processes (plain interpreters, a bare loop) for the
    whole run; terminated (then killed) in any case."""
    k = os.cpu_count() or 1
    until = time.time() + seconds + 30  # a backstop; they are terminated below anyway
    spinners: list[subprocess.Popen] = []
    try:
        for _ in range(k):
            spinners.append(subprocess.Popen([sys.executable, "-c", SPIN, str(until)]))
        ps = [psutil.Process(p.pid) for p in spinners]
        time.sleep(1.0)  # let them start spinning
        for p in ps:
            p.cpu_percent(None)
        load0 = os.getloadavg()
        res = realtime_run(n, seed=seed, warm_s=6.0, stop_at_s=seconds - 5.0, end_s=seconds, label="busy")
        res["spinners"] = k
        res["spinner_cpu_pct_each"] = [round(p.cpu_percent(None), 1) for p in ps]
        res["loadavg_before"] = load0
        res["loadavg_after"] = os.getloadavg()
        res["busy_seconds"] = seconds
        return res
    finally:
        for p in spinners:
            if p.poll() is None:
                p.terminate()
        for p in spinners:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- main --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--realtime-sizes", default=None, help="default: the same as --sizes")
    ap.add_argument("--busy-seconds", type=float, default=60.0, help="0 skips the busy run")
    ap.add_argument("--busy-agents", type=int, default=10_000)
    ap.add_argument("--measure-seconds", type=int, default=10, help="simulated seconds timed per size")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--no-gc-off-variant", action="store_true",
                    help="skip the diagnostic largest-size realtime run with the cyclic GC disabled")
    ap.add_argument("--json", type=Path, default=RESULTS / "tron_scale.json")
    ap.add_argument("--_mem-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain SIGTERM still runs the cleanup below
    if args._mem_child is not None:
        print(json.dumps(_mem_child(args._mem_child, args._trace, args.seed)))
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    rt_sizes = [int(x) for x in (args.realtime_sizes or args.sizes).split(",") if x]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    t_begin = time.monotonic()
    out: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name] + sys.argv),
                 "params": {"interval_s": INTERVAL, "miss_threshold": MISS_THRESHOLD, "beat_timeout_s": BEAT_TIMEOUT,
                            "sample_stopped": SAMPLE, "seed": args.seed}}
    print(f"machine: {out['machine']}")
    threads_before = set(threading.enumerate())

    # 1. CPU
    cpu = []
    for n in sizes:
        cpu.append(cpu_run(n, warm_s=4, measure_s=args.measure_seconds, seed=args.seed))
        gc.collect()
    out["cpu"] = cpu
    print()
    print(table("1. monitor CPU (FakeClock, no thread; thread_time; p50 over simulated seconds)",
                ["agents", "beat ns p50", "min", "max", "loop ns", "beat net ns", "tick ms p50", "tick ms max",
                 "ns/popped", "amortized ns/beat", "net", "heap", "GC max ms", "gen0 objs max"],
                [[c["agents"], c["beat_cpu_ns_p50"], c["beat_cpu_ns_min"], c["beat_cpu_ns_max"], c["loop_baseline_ns"],
                  c["beat_cpu_ns_net_p50"], c["tick_cpu_ms_p50"], c["tick_cpu_ms_max"], c["tick_ns_per_popped"],
                  c["monitor_cpu_ns_per_beat_amortized"], c["monitor_cpu_ns_per_beat_amortized_net"], c["heap_len"],
                  c["gc_max_pause_ms"], c["gc_young_objects_max_after_tick"]]
                 for c in cpu]))
    for c in cpu:
        if c["beats_accepted_all"] != c["expected_accepted_all"] or c["signals_fired"]:
            print(f"  !! {c['agents']}: accepted {c['beats_accepted_all']} of {c['expected_accepted_all']}, "
                  f"fired {c['signals_fired']}")

    # profile at the largest size
    big = max(sizes)
    prof = cpu_profile(big, seed=args.seed, out_path=args.json.with_name(args.json.stem + "_profile.txt"))
    out["profile"] = {k: v for k, v in prof.items() if k != "text"}
    print(f"\ncProfile, {big:,} agents, {prof['beats']:,} beats + {int(BEAT_TIMEOUT)} ticks "
          f"(one full re-arm cycle), sorted by tottime (cProfile inflates call overhead):")
    print("\n".join(ln for ln in prof["text"].splitlines() if ln.strip())[:4000])

    # 2. memory
    mem = [memory_run(n, args.seed) for n in sizes]
    out["memory"] = mem
    print()
    print(table("2. memory of the monitor in steady state (fresh process per size; names allocated before)",
                ["agents", "RSS growth MB", "B/agent RSS", "traced MB", "B/agent traced", "traced peak MB",
                 "heap len"],
                [[x["agents"], x["rss_growth_mb"], x["bytes_per_agent_rss"], x["traced_current_mb"],
                  x["bytes_per_agent_traced"], x["traced_peak_mb"], x["heap_len"]] for x in mem]))
    top = mem[-1]["top_lines"]
    print(f"  top allocation sites at {mem[-1]['agents']:,}: " +
          "; ".join(f"{t['where']} {t['mb']} MB/{t['blocks']:,} blocks" for t in top))

    # 3. realtime lateness
    rt = []
    for n in rt_sizes:
        rt.append(realtime_run(n, seed=args.seed, warm_s=6.0, stop_at_s=6.0, end_s=6.0 + INTERVAL + BEAT_TIMEOUT + 0.6,
                               label="idle"))
        gc.collect()
    if not args.no_gc_off_variant:
        # diagnostic: the largest run again with the cyclic GC disabled, to show how much of the
        # lateness there is collection pauses (not a setting the daemon should use)
        rt.append(realtime_run(max(rt_sizes), seed=args.seed, warm_s=6.0, stop_at_s=6.0,
                               end_s=6.0 + INTERVAL + BEAT_TIMEOUT + 0.6, label="idle", gc_off=True))
        gc.collect()
    out["realtime"] = rt
    print()
    print(table(f"3. detection in real time (real MonitorThread; {SAMPLE} agents stopped; ms)",
                ["agents", "run", "alerts", "missed", "false", "late p50", "late p99", "late max", "deliver p99",
                 "deliver max", "drv lag p99", "drv lag max", "lag max incl start", "ticks/s", "mon cpu %",
                 "drv cpu %"],
                [[x["agents"], x["label"], x["alerts_for_stopped"], x["missed_stopped"], x["false_alarms"],
                  x["lateness_ms_p50"], x["lateness_ms_p99"], x["lateness_ms_max"], x["delivery_ms_p99"],
                  x["delivery_ms_max"], x["driver_lag_ms_p99_steady"], x["driver_lag_ms_max_steady"],
                  x["driver_lag_ms_max_incl_startup"], x["monitor_ticks_per_s"], x["monitor_thread_cpu_pct"],
                  x["driver_thread_cpu_pct"]] for x in rt]))
    print(table("   garbage collection in the steady window, and what it explains",
                ["agents", "run", "gen0 GCs", "gen0 max ms", "gen1 GCs", "gen1 max ms", "gen2 GCs", "gen2 max ms",
                 "alerts > 10 ms late", "of which during GC", "driver batches > 50 ms late", "of which during GC"],
                [[x["agents"], x["label"]] + [x["gc_steady"][f"gen{g}"][k] for g in (0, 1, 2) for k in ("count", "max_ms")]
                 + [x["alerts_later_than_10ms"], x["of_which_overlapping_a_gc_pause"],
                    x["driver_batches_later_than_50ms"], x["of_which_overlapping_a_gc"]] for x in rt]))
    for x in rt:
        keeps_up = (x["driver_lag_ms_max_steady"] or 0) < 100.0
        x["driver_keeps_up"] = keeps_up
        if not keeps_up:
            print(f"  !! {x['agents']:,} ({x['label']}): the driver fell behind (steady max lag "
                  f"{x['driver_lag_ms_max_steady']} ms; p99 {x['driver_lag_ms_p99_steady']} ms)")

    # 4. busy
    if args.busy_seconds > 0:
        b = busy_run(args.busy_agents, args.busy_seconds, seed=args.seed + 1)
        out["busy"] = b
        print()
        print(table(f"4. false alarms, {b['agents']:,} agents for {b['busy_seconds']:.0f} s, "
                    f"{b['spinners']} CPU spinners (ms)",
                    ["agents", "false alarms", "stopped", "alerts", "missed", "late p50", "late p99", "late max",
                     "drv lag p99", "drv lag max", "lag max incl start", "beats sent", "rejected", "mon cpu %",
                     "spinner cpu %"],
                    [[b["agents"], b["false_alarms"], b["sample_stopped"], b["alerts_for_stopped"], b["missed_stopped"],
                      b["lateness_ms_p50"], b["lateness_ms_p99"], b["lateness_ms_max"],
                      b["driver_lag_ms_p99_steady"], b["driver_lag_ms_max_steady"],
                      b["driver_lag_ms_max_incl_startup"], b["driver_beats_sent"], b["driver_beats_rejected"],
                      b["monitor_thread_cpu_pct"], "/".join(str(c) for c in b["spinner_cpu_pct_each"])]]))
        print(f"  gc in the steady window: {b['gc_steady']}; driver batches > 50 ms late: "
              f"{b['driver_batches_later_than_50ms']} (during a GC: {b['of_which_overlapping_a_gc']})")
        print(f"  loadavg before {b['loadavg_before']}, after {b['loadavg_after']}")

    # targets
    c_big = next(c for c in cpu if c["agents"] == big)
    m_big = next(x for x in mem if x["agents"] == big)
    targets = {
        f"cpu_per_beat_{big}_under_20us": {
            "value_us": c_big["monitor_cpu_ns_per_beat_amortized"] / 1e3, "target_us": 20.0,
            "met": c_big["monitor_cpu_ns_per_beat_amortized"] < 20_000},
        f"memory_{big}_under_200MB": {"value_mb": round(max(m_big["rss_growth_mb"], m_big["traced_current_mb"]), 1),
                                      "target_mb": 200.0,
                                      "met": max(m_big["rss_growth_mb"], m_big["traced_current_mb"]) < 200},
        "lateness_p99_under_50ms": {
            f'{x["agents"]} {x["label"]}': {"value_ms": x["lateness_ms_p99"], "met": x["lateness_ms_p99"] is not None
                                            and x["lateness_ms_p99"] < 50 and x["missed_stopped"] == 0}
            for x in rt},
    }
    if "busy" in out:
        targets["zero_false_alarms_busy"] = {"value": out["busy"]["false_alarms"],
                                             "met": out["busy"]["false_alarms"] == 0}
    out["targets"] = targets
    print("\ntargets:")
    for k, v in targets.items():
        print(f"  {k}: {v}")

    # nothing left behind
    leftovers = [f"{p.pid}:{p.name()}" for p in psutil.Process().children(recursive=True)]
    extra_threads = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    out["left_behind"] = {"processes": leftovers, "threads": extra_threads}
    out["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    print(f"\nleft behind: processes {leftovers or 'none'}, threads {extra_threads or 'none'}; "
          f"elapsed {out['elapsed_s']} s")
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
