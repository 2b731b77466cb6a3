"""The GPU machine's scripts (``benchmarks/gpu``): they only run there, where a broken line
costs a session's device time, so here every script must parse, and the drivers' flags must
make valid ``bench_latency`` / ``bench_serving`` configurations."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_latency import parse_args
from ralmspec_vllm.core.config import SpeculationConfig

GPU = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu"


def run_with_fake_python(
    tmp_path: Path, script: str, *args: str, **env_vars: str
) -> list[list[str]]:
    """Run ``script`` (with ``env_vars`` set) against a ``python3`` that only records its
    arguments: the argv of each ``python3`` the script started, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    fake = bin_dir / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ -n "$FAKE_PYTHON_AFFINITY" ]; then\n'  # the cores it runs on, e.g. under taskset
        '  taskset -cp $$ | sed "s/.*: //" > "$FAKE_PYTHON_AFFINITY"\n'
        "fi\n"
        f'printf "%s\\n" "$@" "--END--" >> {shlex.quote(str(record))}\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, **env_vars, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(GPU / script), *args], check=True, env=env, cwd=GPU.parent.parent)
    return [r.strip("\n").splitlines() for r in record.read_text().split("--END--") if r.strip()]


def refusal(script: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``env_vars`` set, expecting it to refuse: its result, for checks."""
    return subprocess.run(
        ["bash", str(GPU / script), *args],
        env={**os.environ, **env_vars},
        capture_output=True,
        text=True,
    )


def retriever_config(server_args: Sequence[str]) -> Any:
    """The retriever child's configuration, as its own parser reads the ``--retriever-arg``
    flags among a ``bench_serving`` run's server args."""
    import argparse

    from ralmspec_vllm.retrieval.factory import add_retriever_arguments, config_from_args

    prefix = "--retriever-arg="
    parser = argparse.ArgumentParser()
    add_retriever_arguments(parser)
    return config_from_args(
        parser.parse_args([a.removeprefix(prefix) for a in server_args if a.startswith(prefix)])
    )


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_script_parses(script: str) -> None:
    subprocess.run(["bash", "-n", str(GPU / script)], check=True)


def test_headline_command_is_a_valid_bench_latency_run(tmp_path: Path) -> None:
    """``latency_21m.sh`` run against a ``python3`` that only records its arguments."""
    out = tmp_path / "out"
    (argv,) = run_with_fake_python(tmp_path, "latency_21m.sh", str(out), "--seed", "3")
    assert argv[0] == "benchmarks/bench_latency.py"
    cfg = parse_args(argv[1:])  # the dataclass validates every value, methods included
    assert cfg.filler == 21_000_000 and cfg.flat_scan == "circular" and cfg.seed == 3
    assert cfg.ordered_methods[:2] == ["baseline", "oracle"] and len(cfg.methods) == 3
    assert cfg.out_dir == str(out) and cfg.questions_per_dataset == 34


def test_fallback_comparison_runs_bench_serving_with_it_on_then_off(tmp_path: Path) -> None:
    """``serving_fallback_21m.sh``: two valid ``bench_serving`` runs, the same but for the
    fallback flag, with retriever flags the retriever's own parser accepts."""
    from benchmarks.bench_serving import parse_args as parse_serving

    out = tmp_path / "out"
    runs = run_with_fake_python(
        tmp_path, "serving_fallback_21m.sh", str(out), "--concurrency", "64"
    )
    assert len(runs) == 2
    cfgs = [parse_serving(argv[1:]) for argv in runs]  # validates every value
    on, off = cfgs
    assert [c.name for c in cfgs] == ["serving_21m_fallback-on", "serving_21m_fallback-off"]
    assert on.filler == 21_000_000 and on.concurrency == off.concurrency == (64,)  # args win
    assert set(off.server_args) - set(on.server_args) == {"--max-retriever-utilization=0"}
    assert not any("utilization" in a for a in on.server_args)  # the shipped default
    config = retriever_config(on.server_args)
    assert (config.flat_impl, config.device, config.dtype, config.flat_scan) == (
        "torch",
        "cpu",
        "bfloat16",
        "circular",
    )
    assert config.threads == 12


def test_fallback_comparison_can_run_one_mode(tmp_path: Path) -> None:
    (on,) = run_with_fake_python(tmp_path, "serving_fallback_21m.sh", "out", FALLBACK_MODES="on")
    assert "serving_21m_fallback-on" in on and not any("utilization" in a for a in on)
    bad = refusal("serving_fallback_21m.sh", "out", FALLBACK_MODES="of")
    assert bad.returncode == 2 and "FALLBACK_MODES" in bad.stderr


def test_fallback_comparison_can_pin_the_server_and_the_retriever(tmp_path: Path) -> None:
    from benchmarks.bench_serving import parse_args as parse_serving

    cores = sorted(os.sched_getaffinity(0))  # taskset needs cores this machine has
    server, retriever = str(cores[-1]), f"{cores[0]}-{cores[-1]}"
    record = tmp_path / "affinity"
    (argv,) = run_with_fake_python(
        tmp_path,
        "serving_fallback_21m.sh",
        "out",
        FALLBACK_MODES="on",
        PIN_CPUS=f"{server}:{retriever}",
        FAKE_PYTHON_AFFINITY=str(record),
    )
    cfg = parse_serving(argv[1:])
    assert cfg.name == "serving_21m_fallback-on-pinned"
    assert {f"--cpus={server}", f"--retriever-arg=--cpus={retriever}"} <= set(cfg.server_args)
    if shutil.which("taskset"):  # the load generator ran on the server's cores
        assert record.read_text().split() == [server]
    bad = refusal("serving_fallback_21m.sh", "out", PIN_CPUS="0-11")
    assert bad.returncode == 2 and "PIN_CPUS" in bad.stderr


def test_serving_modes_runs_bench_serving_in_rounds_then_pipelined_early(tmp_path: Path) -> None:
    """``serving_modes_1m.sh``: two valid ``bench_serving`` runs over IVF at 1M, the same but
    for the speculation mode; the server's own parser turns the second's flags into the
    pipeline with early verification and the first's into the shipped rounds."""
    from benchmarks.bench_serving import parse_args as parse_serving
    from ralmspec_vllm.entrypoints.cli import build_parser
    from ralmspec_vllm.entrypoints.serve import service_config_from_args

    runs = run_with_fake_python(tmp_path, "serving_modes_1m.sh", "out", "--concurrency", "8")
    rounds, early = (parse_serving(argv[1:]) for argv in runs)  # validates every value
    assert (rounds.name, early.name) == ("serving_1m-ivf_rounds", "serving_1m-ivf_early")
    assert rounds.filler == 1_000_000 and rounds.concurrency == early.concurrency == (8,)
    assert set(early.server_args) - set(rounds.server_args) == {
        "--overlap-depth=pipeline",
        "--early-verification",
    }
    specs = []
    for cfg in (rounds, early):
        serve = [a for a in cfg.server_args if not a.startswith("--retriever-arg=")]
        args = build_parser(["serve", *serve]).parse_args(["serve", *serve])
        specs.append(service_config_from_args(args).speculation)
    assert (specs[0].overlap_depth, specs[0].early_verification) == ("stride", False)
    assert (specs[1].overlap_depth, specs[1].early_verification) == ("pipeline", True)
    config = retriever_config(rounds.server_args)
    assert (config.backend, config.nlist, config.nprobe, config.ivf_build) == (
        "ivf",
        1024,
        16,
        "faiss",
    )
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    (one,) = run_with_fake_python(one_dir, "serving_modes_1m.sh", "o", SERVING_MODES="early")
    assert "serving_1m-ivf_early" in one
    off_dir = tmp_path / "off"
    off_dir.mkdir()
    on, off = (  # the event-loop fallback on (the server's default) and off
        parse_serving(argv[1:])
        for argv in run_with_fake_python(
            off_dir, "serving_modes_1m.sh", "o", SERVING_MODES="rounds rounds-loop-off"
        )
    )
    assert off.name == "serving_1m-ivf_rounds-loop-off"
    assert set(off.server_args) - set(on.server_args) == {"--max-loop-cpu=0"}
    loops = []
    for cfg in (on, off):
        serve = [a for a in cfg.server_args if not a.startswith("--retriever-arg=")]
        args = build_parser(["serve"]).parse_args(["serve", *serve])
        loops.append(service_config_from_args(args))
    assert (loops[0].max_loop_cpu, loops[1].max_loop_cpu) == (0.6, None)
    bad = refusal("serving_modes_1m.sh", "out", SERVING_MODES="pipeline")
    assert bad.returncode == 2 and "SERVING_MODES" in bad.stderr


def test_approx_latency_command_is_a_valid_bench_latency_run(tmp_path: Path) -> None:
    (argv,) = run_with_fake_python(tmp_path, "approx_latency_1m.sh", "out", "--time-budget-s", "90")
    assert argv[0] == "benchmarks/bench_latency.py"
    cfg = parse_args(argv[1:])
    assert cfg.backends == ("hnsw", "ivf", "bm25") and cfg.filler == 1_000_000
    assert cfg.ordered_methods[:2] == ["baseline", "oracle"] and len(cfg.methods) == 5
    assert any(SpeculationConfig.parse(m).early_verification for m in cfg.methods[2:])
    assert cfg.time_budget_s == 90  # a later argument wins


def test_qwen_1m_command_is_a_valid_bench_latency_run(tmp_path: Path) -> None:
    (argv,) = run_with_fake_python(tmp_path, "qwen_latency_1m.sh", "out", "--time-budget-s", "9")
    assert argv[0] == "benchmarks/bench_latency.py"
    cfg = parse_args(argv[1:])
    assert cfg.model == "qwen2.5-0.5b" and cfg.dtype == "float32"
    assert cfg.backends == ("flat",) and cfg.filler == 1_000_000 and cfg.time_budget_s == 9
    assert cfg.ordered_methods[:2] == ["baseline", "oracle"] and len(cfg.methods) == 4
    assert SpeculationConfig.parse(cfg.methods[3]).early_verification


def test_ivf_21m_command_is_a_valid_bench_latency_run(tmp_path: Path) -> None:
    (argv,) = run_with_fake_python(tmp_path, "approx_latency_21m.sh", "out", "--nprobe", "32")
    assert argv[0] == "benchmarks/bench_latency.py"
    cfg = parse_args(argv[1:])
    assert cfg.backends == ("ivf",) and cfg.filler == 21_000_000
    assert (cfg.ivf_nlist, cfg.ivf_codec, cfg.ivf_nprobe) == (4096, "sq8", 32)  # args win
    assert cfg.label("ivf") == "ivf-nlist4096-nprobe32-sq8" and cfg.save_index is False
    assert cfg.ordered_methods[:2] == ["baseline", "oracle"]
    assert any(SpeculationConfig.parse(m).early_verification for m in cfg.methods[2:])


def test_bm25_21m_command_is_a_valid_bench_latency_run(tmp_path: Path) -> None:
    (argv,) = run_with_fake_python(tmp_path, "bm25_latency_21m.sh", "out", "--time-budget-s", "9")
    assert argv[0] == "benchmarks/bench_latency.py"
    cfg = parse_args(argv[1:])
    assert cfg.backends == ("bm25",) and cfg.filler == 21_000_000 and cfg.time_budget_s == 9
    assert cfg.save_index is False  # a lent machine never starts again from this disk
    assert cfg.ordered_methods[:2] == ["baseline", "oracle"] and len(cfg.methods) == 3
    assert SpeculationConfig.parse(cfg.methods[2]).early_verification
    assert cfg.cache_scoring == "local"
    assert (cfg.bm25_threads, cfg.probe_bm25_threads) == (12, (1, 12))


def test_retrieval_21m_command_is_a_valid_bench_retrieval_run(tmp_path: Path) -> None:
    from benchmarks.bench_retrieval import parse_args as parse_retrieval

    (argv,) = run_with_fake_python(
        tmp_path, "retrieval_21m.sh", "out", "--backends", "flat,ivf,bm25"
    )
    assert argv[0] == "benchmarks/bench_retrieval.py"
    cfg = parse_retrieval(argv[1:])
    assert (cfg.sizes, cfg.filler_total, cfg.save_index) == (("filler",), 21_000_000, False)
    labels = [v.label for v in cfg.variants(cuda_available=True)]
    assert labels == [
        "flat", "flat-torch-bfloat16", "flat-cuda-bfloat16", "ivf", "ivf-g12", "bm25-t1",
        "bm25-t12",
    ]  # fmt: skip
    params = cfg.index_params(21_000_000)
    assert (params.nlist, params.nprobe, params.ivf_codec) == (4096, 64, "sq8")


def test_abort_probe_command_is_a_valid_probe_run(tmp_path: Path) -> None:
    from benchmarks.probe_abort import parse_args as parse_probe

    (argv,) = run_with_fake_python(tmp_path, "probe_abort.sh", "out", "--trials", "5")
    assert argv[0] == "benchmarks/probe_abort.py"
    args = parse_probe(argv[1:])
    assert (args.out_dir, args.trials, args.abort_after_ms) == ("out", 5, [1.0, 3.0, 10.0])


def test_bm25_concurrency_probe_command_is_a_valid_probe_run(tmp_path: Path) -> None:
    """``probe_bm25_concurrency.sh``: the 21M index, 12/4/1 threads, 1/3/12 callers, into
    OUTDIR; the flags are the probe's own (its parser rejects an unknown one)."""
    from benchmarks.probe_bm25_concurrency import parse_args as parse_probe

    (argv,) = run_with_fake_python(tmp_path, "probe_bm25_concurrency.sh", "out", "--searches", "9")
    assert argv[0] == "benchmarks/probe_bm25_concurrency.py"
    args = parse_probe(argv[1:])
    assert (args.filler, args.threads, args.concurrency) == (21_000_000, "12,4,1", "1,3,12")
    assert (args.searches, args.out) == (9, "out/probe_bm25_concurrency_21m.json")


def test_gpu_tests_step_runs_the_gpu_marked_tests_and_keeps_their_log(tmp_path: Path) -> None:
    """``gpu_tests.sh OUTDIR [paths]``: pytest -m gpu on the default folders or the paths
    given; its exit status is pytest's."""
    out = tmp_path / "out"
    (argv,) = run_with_fake_python(tmp_path, "gpu_tests.sh", str(out))
    assert argv == ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                    "tests/engine", "tests/retrieval"]  # fmt: skip
    assert (out / "gpu_tests.log").exists()
    (tmp_path / "b").mkdir()
    (argv,) = run_with_fake_python(tmp_path / "b", "gpu_tests.sh", str(out), "tests/x.py", "-x")
    assert argv[-2:] == ["tests/x.py", "-x"]
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "python3").write_text("#!/bin/sh\necho boom\nexit 3\n")
    (failing / "python3").chmod(0o755)
    done = subprocess.run(
        ["bash", str(GPU / "gpu_tests.sh"), str(out)],
        env={**os.environ, "PATH": f"{failing}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 3 and "boom" in (out / "gpu_tests.log").read_text()


def test_matmul_probe_command_keeps_its_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (argv,) = run_with_fake_python(tmp_path, "probe_matmul.sh", str(out), "--repeats", "2")
    assert argv == ["benchmarks/gpu/probe_matmul.py", "--docs", "4000000", "--batches",
                    "1,16,64,256", "--dtypes", "bfloat16", "--repeats", "2"]  # fmt: skip
    assert (out / "probe_matmul.txt").exists()


def test_encoder_probe_command_and_its_cpu_run(tmp_path: Path) -> None:
    """``probe_encoder.sh`` runs the probe into OUTDIR; on this machine (no CUDA) the probe
    times the shipped encoder alone and beside a GIL-holding thread and says so."""
    import json
    import sys

    (argv,) = run_with_fake_python(tmp_path, "probe_encoder.sh", "out")
    assert argv == ["benchmarks/gpu/probe_encoder.py", "--out-dir", "out", "--texts", "300"]
    out = tmp_path / "probe"
    subprocess.run(
        [sys.executable, str(GPU / "probe_encoder.py"), "--texts", "8", "--out-dir", str(out)],
        check=True,
        cwd=GPU.parent.parent,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    (written,) = out.glob("probe_encoder_*.json")
    data = json.loads(written.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["texts"] == 8
    assert [(r["variant"], r["load"]) for r in data["results"]] == [
        ("shipped", "idle"),
        ("shipped", "duty20"),
    ]
    assert all(r["p90_ms"] >= r["p50_ms"] > 0 for r in data["results"])


def test_guess_probe_command_and_its_cpu_run(tmp_path: Path) -> None:
    """``probe_guess.sh`` runs the probe into OUTDIR; on this machine (no CUDA) it times the
    encoder, both guesses and scoring alone, idle and loaded, and both guesses choose the
    same documents."""
    import json
    import sys

    (argv,) = run_with_fake_python(tmp_path, "probe_guess.sh", "out")
    assert argv == ["benchmarks/gpu/probe_guess.py", "--out-dir", "out", "--texts", "300"]
    out = tmp_path / "probe"
    subprocess.run(
        [sys.executable, str(GPU / "probe_guess.py"), "--texts", "6", "--cache-docs", "300",
         "--out-dir", str(out)],
        check=True,
        cwd=GPU.parent.parent,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    (written,) = out.glob("probe_guess_*.json")
    data = json.loads(written.read_text())
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["texts"] == 6 and meta["cache_docs"] == 300
    assert meta["guesses_identical_inline_and_thread"] is True
    variants = ("encoder", "guess-inline", "guess-thread", "score-only")
    assert [(r["variant"], r["load"]) for r in data["results"]] == [
        (v, load) for load in ("idle", "duty20") for v in variants
    ]
    assert all(r["p90_ms"] >= r["p50_ms"] > 0 for r in data["results"])
    assert set(meta["derived_p50_ms"]) == {"idle", "duty20"}


def test_ivf_build_probe_command_and_its_cpu_run(tmp_path: Path) -> None:
    """``probe_ivf_build.sh`` runs the probe into OUTDIR; without CUDA the probe times
    FAISS's k-means under each OpenBLAS kernel set (each child names the core it ran),
    torch's on the CPU, and a whole FAISS build, and records the kernels as shipped."""
    import json
    import sys

    (argv,) = run_with_fake_python(tmp_path, "probe_ivf_build.sh", "out")
    assert argv == ["benchmarks/gpu/probe_ivf_build.py", "--out-dir", "out", "--docs", "2000000"]
    out = tmp_path / "probe"
    small = ["--docs", "20000", "--nlist", "32", "--sample", "4096", "--threads", "1"]
    subprocess.run(
        [sys.executable, str(GPU / "probe_ivf_build.py"), *small, "--out-dir", str(out)],
        check=True,
        cwd=GPU.parent.parent,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
    )
    (written,) = out.glob("probe_ivf_build_*.json")
    data = json.loads(written.read_text())
    rows = data["rows"]
    assert [r["what"] for r in rows] == ["faiss_kmeans"] * 3 + ["torch_kmeans", "ivf_build"]
    assert [r["coretype"] for r in rows[:3]] == ["", "SkylakeX", "Haswell"]
    for row in rows[1:3]:  # an override names the kernels OpenBLAS then ran
        assert row["openblas"].startswith(row["coretype"]), row
    assert all(r["seconds"] > 0 for r in rows) and rows[-1]["hits_per_query"] == 10
    from ralmspec_vllm import openblas

    expected = os.environ.get(openblas.ENV) or openblas.coretype_for(openblas.cpu_flags())
    if expected is not None:  # what importing ralmspec_vllm first leaves faiss running
        assert data["meta"]["openblas_as_shipped"].split()[0] == expected


def test_chain_runs_its_steps_in_order_with_their_environment(tmp_path: Path) -> None:
    """``chain.sh``: the next session's plan as one driver; leading VAR=value words set a
    step's environment (here FALLBACK_MODES=on: one serving run, not two)."""
    out = tmp_path / "out"
    runs = run_with_fake_python(
        tmp_path,
        "chain.sh",
        str(out),
        "FALLBACK_MODES=on serving_fallback_21m.sh --concurrency 1,8",
        "approx_latency_1m.sh --time-budget-s 60",
    )
    assert [argv[0] for argv in runs] == [
        "benchmarks/bench_serving.py",
        "benchmarks/bench_latency.py",
    ]
    assert "serving_21m_fallback-on" in runs[0] and "1,8" in runs[0]
    assert parse_args(runs[1][1:]).time_budget_s == 60
    # what the machine had before each step (memory, disk, the largest process), for a
    # machine lost mid-chain
    samples = (out / "resources.log").read_text().splitlines()
    befores = [line for line in samples if "before:" in line]
    assert [line.split("before: ")[1] for line in befores] == [
        "FALLBACK_MODES=on serving_fallback_21m.sh --concurrency 1,8",
        "approx_latency_1m.sh --time-budget-s 60",
    ]
    for line in befores:
        assert re.search(r"mem used \d+ avail \d+ MiB disk used \d+ avail \d+ MiB top \S+", line)


def test_chain_refuses_a_missing_script_before_running_anything(tmp_path: Path) -> None:
    bad = refusal("chain.sh", "out", "latency_21m.sh", "X=1 no_such.sh --a")
    assert bad.returncode == 2 and "no_such.sh" in bad.stderr


def test_chain_runs_the_next_step_after_a_failure_and_reports_it(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_with_fake_python(
            tmp_path, "chain.sh", str(tmp_path / "out"),
            "FALLBACK_MODES=of serving_fallback_21m.sh", "approx_latency_1m.sh",
        )  # fmt: skip
    assert failed.value.returncode == 2  # the first step's
    record = (tmp_path / "argv").read_text()
    assert "benchmarks/bench_latency.py" in record and "bench_serving" not in record


def test_the_working_tree_leaves_room_for_a_carry_piece() -> None:
    """Every device call carries the working tree plus what it names, at most 64 MiB. A
    staging call names one piece of ``PIECE`` (prepare.sh); with a 4 MiB margin the tracked
    files must stay under the rest. Session 16 lost its first batch of calls to a tree
    (8.4 MiB) that had outgrown 56 MiB pieces: prune results or lower PIECE when this fails."""
    text = (GPU / "prepare.sh").read_text()
    assert (
        "PIECE=${PIECE:-48M}" in text
        and '"${PIECE:-48M}"' in (GPU / "build_vllm_bundle.sh").read_text()
    )
    root = GPU.parent.parent
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True
    ).stdout.split(b"\0")
    tree = sum((root / name.decode()).stat().st_size for name in listed if name)
    assert tree + 48 * 2**20 <= 60 * 2**20, f"tracked files: {tree / 2**20:.1f} MiB"
