"""Issue 20's device run: the CUDA test suite, train-toy and eval on the GPU, top-k vs SDPA, one JSON.

Started by benchmarks/gpu_check.sh on the lent GPU machine (see docs/gpu.md); every stage runs in
its own process group with a timeout taken from one global deadline, so a hang or a crash in one
stage loses only that stage, and the JSON is rewritten after every stage (a partial run still
leaves a valid file).  Subcommands:

    python benchmarks/gpu_check.py run --out DIR [--budget S | --deadline EPOCH] [--dry-run]
    python benchmarks/gpu_check.py probe [--dry-run]         # versions, GPU name, one Numba kernel
    python benchmarks/gpu_check.py bench [--sizes T ...] [--dry-run]   # ROW lines, one per size
    python benchmarks/gpu_check.py cli -- train-toy ...      # the topkattn CLI of this checkout

``run`` writes under DIR: gpu_check.json (the results), setup.log (probe), pytest.log,
pytest_cuda.xml, pytest_extra.xml, cli.log (train-toy and eval), bench.log.  Stages, in order:
probe, pytest_cuda (``pytest -m cuda``, real kernels), bench (top-k fwd and fwd+bwd vs torch SDPA
flash at T = S = 8k, 32k, 64k, H=8, D=64, k=8, causal, B=1), train_toy (``train-toy --k 8
--device gpu``), eval (``eval --retriever exact --device gpu`` on the train-toy run),
pytest_extra (the GPU branches of the torch/JAX interop and the LoRANN CuPy tests).

``--dry-run`` runs the same stages on the CPU at tiny sizes: the CUDA simulator for the tests,
NumPy arrays for the op, torch SDPA on the CPU, train-toy --device cpu for 10 steps, in two lanes
at once (tests first, measurements second) to keep tests/test_gpu_check.py short.  Every number in
its JSON is measured; only ``"dry_run": true`` tells it apart.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
SIZES = (8192, 32768, 65536)
DRY_SIZES = (64, 128)
SHAPE = dict(B=1, H=8, D=64, k=8)  # the grid; causal, T = S
DRY_LANES = (("probe", "pytest_cuda", "pytest_extra"), ("bench", "train_toy", "eval"))  # logs stay per lane
MIN_STAGE_S = 5  # a stage given less is skipped
FLOOR_S = 30  # a stage gets this much (while the budget has it) even when later reserves are short
KILL_GRACE_S = 15  # after SIGINT (pytest then writes its junit XML and summary), before SIGKILL


# ----------------------------------------------------------------------------- parsing
_OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_VERBOSE = [  # pytest -v: "tests/x.py::t[p] PASSED [ 3%]"; with xdist: "[gw0] [  3%] PASSED tests/x.py::t[p]"
    re.compile(r"^(?P<id>\S+::\S+)\s+(?P<out>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"),
    re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(?P<out>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?P<id>\S+::\S+)"),
]
_SUMMARY = re.compile(r"^=+ (?P<body>.*\d+ (?:passed|failed|skipped|errors?|xfailed|xpassed|deselected)"
                      r".*) in [\d.]+s.*=+$")


def empty_counts(source: str) -> dict:
    return dict(passed=0, failed=0, skipped=0, errors=0, xfailed=0, xpassed=0, total=0, source=source,
                failures=[], skip_reasons={})


def parse_junit(path: str | os.PathLike) -> dict:
    """Counts, failures and skip reasons from a pytest junit XML file.

    ``failed`` counts failures and errors (a crashed or erroring test is not a pass); ``errors``
    is the errors alone.  Raises OSError / ET.ParseError for a missing or truncated file.
    """
    root = ET.parse(path).getroot()
    res = empty_counts("junit")
    for case in root.iter("testcase"):
        res["total"] += 1
        name = "::".join(p for p in (case.get("classname", ""), case.get("name", "")) if p)
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            res["failed"] += 1
            res["errors"] += tag == "error"
            msg = (kinds[tag].get("message") or (kinds[tag].text or "")).strip().splitlines()
            res["failures"].append(dict(test=name, kind=tag, message=(msg[0] if msg else "")[:300]))
        elif "skipped" in kinds:
            sk = kinds["skipped"]
            if sk.get("type") == "pytest.xfail":
                res["xfailed"] += 1
            else:
                res["skipped"] += 1
                reason = _skip_reason(sk)
                res["skip_reasons"][reason] = res["skip_reasons"].get(reason, 0) + 1
        else:
            res["passed"] += 1
    return res


def _skip_reason(el: ET.Element) -> str:
    text = (el.text or el.get("message") or "").strip()
    m = re.search(r"Skipped: (.*?)'?\)?$", text)
    return (m.group(1) if m else text)[:200]


def parse_pytest_output(text: str) -> dict:
    """Counts from pytest's console output: the final summary line when there is one, else the
    per-test lines of ``-v`` (a run killed before its summary); failures from the -v lines."""
    verbose = empty_counts("verbose")
    for line in text.splitlines():
        for rx in _VERBOSE:
            m = rx.match(line.strip())
            if m:
                out = m.group("out")
                key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped",
                       "XFAIL": "xfailed", "XPASS": "xpassed"}[out]
                verbose[key] += 1
                verbose["errors"] += out == "ERROR"
                verbose["total"] += 1
                if key == "failed":
                    verbose["failures"].append(dict(test=m.group("id"), kind=out.lower(), message=""))
                break
    summary = None
    for line in text.splitlines():
        m = _SUMMARY.match(line.strip())
        if m:
            summary = m.group("body")
    if summary is None:
        return verbose
    res = empty_counts("summary")
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary):
        n = int(n)
        if word.startswith("error"):
            res["failed"] += n
            res["errors"] += n
        else:
            res[word] += n
    res["total"] = sum(res[k] for k in ("passed", "failed", "skipped", "xfailed", "xpassed"))
    res["failures"] = verbose["failures"]
    return res


def pytest_result(xml_path: Path, log_text: str) -> dict:
    """The junit XML when it was written and parses, else the console output."""
    try:
        return parse_junit(xml_path)
    except (OSError, ET.ParseError):
        return parse_pytest_output(log_text)


def last_json_line(text: str, prefix: str = "") -> dict | None:
    """The last line of ``text`` that is ``prefix`` followed by a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith(prefix + "{"):
            try:
                return json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                continue
    return None


def json_lines(text: str, prefix: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith(prefix + "{"):
            try:
                out.append(json.loads(line[len(prefix):]))
            except json.JSONDecodeError:
                pass
    return out


# ----------------------------------------------------------------------------- running stages
def child_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX takes 75% of the GPU otherwise
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")  # the device machine runs commands as root
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if dry_run:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)  # real kernels: tests/conftest.py keeps the simulator off
    return env


def stage_header(name: str) -> str:
    return f"[gpu_check] stage {name}: "


def stage_text(log: Path, name: str) -> str:
    """The part of ``log`` that stage ``name`` wrote (logs are shared by appending stages)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    head = stage_header(name)
    return text[text.rfind(head):] if head in text else ""


def run_stage(name: str, cmd: list[str], log: Path, timeout: float, env: dict, append: bool = False) -> dict:
    """Run ``cmd`` in its own process group, stdout+stderr to ``log``; on timeout SIGINT the group,
    then SIGKILL after KILL_GRACE_S.  Returns status ('ok', 'failed', 'timeout'), rc, seconds."""
    t0 = time.monotonic()
    with open(log, "a" if append else "w") as f:
        f.write(f"{stage_header(name)}{' '.join(cmd)}   (timeout {timeout:.0f} s)\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        timed_out = False
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _stop(p)
        except BaseException:  # KeyboardInterrupt from the shell's backstop: leave nothing running
            _stop(p)
            raise
        f.write(f"\n[gpu_check] rc={rc}{' (timed out)' if timed_out else ''} after {time.monotonic() - t0:.1f} s\n")
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    return dict(status=status, rc=rc, seconds=round(time.monotonic() - t0, 2), timeout_s=round(timeout))


def _stop(p: subprocess.Popen) -> int:
    for sig, grace in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return p.wait()


def stage_plan(dry_run: bool, out: Path, work: Path, py: str) -> list[dict]:
    """The stages in order: name, command, cap (max seconds), reserve (seconds kept for it by the
    stages before it), log file."""
    me = [py, str(HERE)]
    # one broken test module must not stop the others from being collected and run
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs", "--color=no",
              "--continue-on-collection-errors"]
    run_dir = str(work / "run")
    if dry_run:
        cuda_tests = ["-m", "cuda", "tests/test_cuda_gpu.py", "tests/test_cuda_kernels.py",
                      "-k", "test_topk_select_matches_rank_row"]
        extra_tests = ["tests/test_ann.py::test_cupy_search_skips_empty_clusters"]
        train = ["train-toy", "--k", "8", "--device", "cpu", "--steps", "10", "--batch-size", "4"]
        evaluate = ["eval", run_dir, "--retriever", "exact", "--n-sequences", "4", "--batch-size", "4"]
        bench = ["--dry-run", "--sizes", *map(str, DRY_SIZES)]
        probe = ["--dry-run"]
    else:
        parallel = (["-n", os.environ.get("GPU_CHECK_WORKERS", "8")] if _has_module(py, "xdist") else [])
        per_test = (["--timeout", "120", "--timeout-method", "thread" if parallel else "signal"]
                    if _has_module(py, "pytest_timeout") else [])
        # GPU_CHECK_CUDA_TESTS: another selection for a rerun, e.g. "-m cuda tests/test_cuda_kernels.py -k mla"
        cuda_tests = [*parallel, *per_test, *shlex.split(os.environ.get("GPU_CHECK_CUDA_TESTS", "-m cuda tests"))]
        extra_tests = [*parallel, *per_test, "tests/test_interop_torch.py", "tests/test_interop_jax.py",
                       "tests/test_ann.py::test_cupy_queries_match_numpy",
                       "tests/test_ann.py::test_cupy_search_skips_empty_clusters"]
        train = ["train-toy", "--k", "8", "--device", "gpu", *shlex.split(os.environ.get("GPU_CHECK_TRAIN_ARGS", ""))]
        evaluate = ["eval", run_dir, "--retriever", "exact", "--device", "gpu"]
        bench = ["--sizes", *map(str, SIZES)]
        probe = []
    return [
        dict(name="probe", cmd=[*me, "probe", *probe], cap=60, reserve=0, log="setup.log", append=True),
        dict(name="pytest_cuda", cmd=[*pytest, f"--junitxml={out / 'pytest_cuda.xml'}", *cuda_tests],
             cap=170, reserve=40, log="pytest.log"),
        dict(name="bench", cmd=[*me, "bench", *bench], cap=150, reserve=60, log="bench.log"),
        dict(name="train_toy", cmd=[*me, "cli", "--", *train, "--quiet", "--json", "--out", run_dir],
             cap=120, reserve=45, log="cli.log"),
        dict(name="eval", cmd=[*me, "cli", "--", *evaluate, "--quiet", "--json"], cap=45, reserve=15,
             log="cli.log", append=True, needs=str(Path(run_dir) / "checkpoint.npz")),
        dict(name="pytest_extra", cmd=[*pytest, f"--junitxml={out / 'pytest_extra.xml'}", *extra_tests],
             cap=90, reserve=20, log="pytest.log", append=True),
    ] + ([] if dry_run else [  # NCCL over two MPI ranks on the one GPU (docs/distributed.md); console counts
        dict(name="pytest_mpi", cmd=["mpiexec", "-n", "2", py, "-m", "pytest", "-p", "no:cacheprovider", "-v",
                                     "-rfEs", "--color=no", "-m", "cuda", "tests/distributed/test_device_comm_mpi.py"],
             cap=60, reserve=15, log="pytest.log", append=True, needs_cmd="mpiexec"),
    ])


def _has_module(py: str, name: str) -> bool:
    r = subprocess.run([py, "-c", f"import {name}"], capture_output=True, timeout=60)
    return r.returncode == 0


def stage_timeout(cap: float, remaining: float, later_reserve: float) -> float:
    """Seconds for a stage: its cap, less what the later stages' reserves need; the reserves give
    way to an earlier stage (which gets at least FLOOR_S while time remains): order is priority."""
    return max(0.0, min(cap, max(remaining - later_reserve, min(remaining, FLOOR_S))))


def run_all(out: Path, deadline: float, dry_run: bool, only: list[str] | None = None) -> dict:
    """Run the stages within ``deadline`` (time.time()), write out/gpu_check.json after each."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work")) / ("dry" if dry_run else "gpu")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = child_env(dry_run)
    t_start = time.time()
    plan = [s for s in stage_plan(dry_run, out, work, sys.executable) if only is None or s["name"] in only]
    result = dict(schema=1, dry_run=dry_run, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), git=_git_head(), device=None, env=None, pytest_cuda=None, train_toy_gpu=None,
        eval=None, ceilings=None, topk_vs_sdpa=[], pytest_extra=None, pytest_mpi=None,
        stages={s["name"]: dict(status="not_run") for s in plan},
        budget_s=round(deadline - t_start), elapsed_s=0.0)
    json_path = out / "gpu_check.json"

    lock = threading.Lock()

    def save():
        with lock:
            result["elapsed_s"] = round(time.time() - t_start, 1)
            tmp = json_path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
            tmp.replace(json_path)

    def run_lane(lane):
        for i, st in enumerate(lane):
            # a stage that times out may take KILL_GRACE_S more to stop: kept out of its time
            timeout = stage_timeout(st["cap"], deadline - time.time() - KILL_GRACE_S,
                                    sum(s["reserve"] for s in lane[i + 1:]))
            if st.get("needs") and not Path(st["needs"]).exists():
                result["stages"][st["name"]] = dict(status="skipped", reason=f"{st['needs']} missing")
            elif st.get("needs_cmd") and not shutil.which(st["needs_cmd"]):
                result["stages"][st["name"]] = dict(status="skipped", reason=f"no {st['needs_cmd']} on PATH")
            elif timeout < MIN_STAGE_S:
                result["stages"][st["name"]] = dict(status="skipped", reason="no time left in the budget")
            else:
                log = out / st["log"]
                if st["name"].startswith("pytest"):
                    (out / f"{st['name']}.xml").unlink(missing_ok=True)  # never read a stale file
                info = run_stage(st["name"], st["cmd"], log, timeout, env, append=st.get("append", False))
                info["log"] = st["log"]
                if info["status"] != "ok":  # the end of its output, for the summary the device call returns
                    lines = [ln for ln in stage_text(log, st["name"]).splitlines()[1:-1] if ln.strip()]
                    info["tail"] = [ln[:300] for ln in lines[-6:]]
                with lock:
                    result["stages"][st["name"]] = info
                    collect(result, st["name"], out, log)
            save()

    save()
    try:
        if dry_run:  # two lanes at once (no timings to protect); each lane keeps its own logs
            lanes = [[s for s in plan if s["name"] in names] for names in DRY_LANES]
            threads = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:  # one after the other: the benchmark has the GPU and the CPUs to itself
            run_lane(plan)
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        save()
    return result


def collect(result: dict, name: str, out: Path, log: Path) -> None:
    """Fold one stage's output into the result."""
    text = stage_text(log, name)
    if name == "probe":
        env = last_json_line(text, "PROBE ")
        result["env"] = env
        result["device"] = env.get("device") if env else None
    elif name in ("pytest_cuda", "pytest_extra", "pytest_mpi"):
        res = pytest_result(out / f"{name}.xml", text)
        res["complete"] = result["stages"][name]["status"] != "timeout"  # a timed-out run counts what ran
        result[name] = res
    elif name == "bench":
        result["ceilings"] = last_json_line(text, "CEILINGS ")
        result["topk_vs_sdpa"] = json_lines(text, "ROW ")
    elif name == "train_toy":
        m = last_json_line(text)
        if m is not None:
            result["train_toy_gpu"] = dict(accuracy=m.get("accuracy"), seconds=m.get("seconds"),
                                           steps=m.get("steps"), device=m.get("device"),
                                           tokens_per_s=m.get("tokens_per_s"),
                                           wall_seconds=result["stages"]["train_toy"]["seconds"])
    elif name == "eval":
        m = last_json_line(text)
        if m is not None:
            result["eval"] = dict(accuracy=m.get("accuracy"), recall=m.get("recall"), seconds=m.get("seconds"),
                                  retriever=m.get("retriever"), device=m.get("device"))


def _git_head() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def summary_text(r: dict) -> str:
    lines = [f"gpu_check{' (DRY RUN)' if r['dry_run'] else ''}: device={r['device']!r}  "
             f"elapsed {r['elapsed_s']} s of {r['budget_s']} s"]
    for name, st in r["stages"].items():
        lines.append(f"  {name:<13} {st.get('status'):<8} {st.get('seconds', '')}"
                     f"{' ' + st['reason'] if st.get('reason') else ''}")
        lines += [f"      | {ln[:200]}" for ln in st.get("tail", [])]
    for key in ("pytest_cuda", "pytest_extra", "pytest_mpi"):
        p = r.get(key)
        if p:
            lines.append(f"{key}: passed {p['passed']} failed {p['failed']} skipped {p['skipped']} "
                         f"(from {p['source']})")
            lines += [f"  FAIL {f['test']}: {f['message'][:160]}" for f in p["failures"][:25]]
            lines += [f"  skip x{n}: {why[:120]}" for why, n in list(p["skip_reasons"].items())[:8]]
    if r.get("train_toy_gpu"):
        lines.append(f"train_toy_gpu: {r['train_toy_gpu']}")
    if r.get("eval"):
        lines.append(f"eval: {r['eval']}")
    if r.get("ceilings"):
        lines.append(f"ceilings: {r['ceilings']}")
    if r["topk_vs_sdpa"]:
        lines.append(f"{'T':>6} {'topk fwd':>9} {'sdpa fwd':>9} {'ratio':>6} {'topk f+b':>9} {'sdpa f+b':>9} "
                     f"{'ratio':>6} {'bwd':>6} {'mem':>6}  (ms; ratios topk/sdpa)")
        for row in r["topk_vs_sdpa"]:
            lines.append(f"{row['T']:>6} {_f(row.get('topk_fwd_ms'))} {_f(row.get('sdpa_fwd_ms'))} "
                         f"{_f(row.get('fwd_ratio'), 6)} {_f(row.get('topk_fwd_bwd_ms'))} "
                         f"{_f(row.get('sdpa_fwd_bwd_ms'))} {_f(row.get('fwd_bwd_ratio'), 6)} "
                         f"{_f(row.get('bwd_ratio'), 6)} {_f(row.get('mem_ratio'), 6)}  {row.get('error') or ''}")
    return "\n".join(lines)


def _f(x, w=9):
    return f"{x:>{w}.3g}" if isinstance(x, (int, float)) else f"{'-':>{w}}"


# ----------------------------------------------------------------------------- probe
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(dry_run: bool) -> int:
    """Print ``PROBE {json}``: versions, the GPU's name (nvidia-smi), one Numba kernel launched.
    Exit 0 when the kernel ran right with numba-cuda < 0.31, 4 when it ran with a newer numba-cuda
    (the project pins < 0.31), 3 when it failed."""
    if dry_run:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba.cuda is imported
    info = dict(python=platform.python_version(), executable=sys.executable, machine=platform.machine(),
                cuda_home=os.environ.get("CUDA_HOME"), simulator=os.environ.get("NUMBA_ENABLE_CUDASIM"),
                versions={d: _version(d) for d in ("numpy", "numba", "numba-cuda", "llvmlite", "cuda-bindings",
                                                   "cuda-core", "cuda-pathfinder", "cupy-cuda13x", "cupy-cuda12x",
                                                   "torch", "jax", "jaxlib", "scipy", "pytest", "pytest-xdist",
                                                   "pytest-timeout", "nvidia-nvvm", "nvidia-cuda-nvcc-cu12")})
    try:
        import numba_cuda

        info["numba_cuda_file"] = numba_cuda.__file__
    except ImportError as e:
        info["numba_cuda_file"] = f"ImportError: {e}"
    smi = shutil.which("nvidia-smi")
    if smi and not dry_run:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        if r.returncode == 0 and r.stdout.strip():
            info["device"] = r.stdout.strip().splitlines()[0].split(",")[0].strip()
    if not dry_run:
        try:
            import cupy as cp

            props = cp.cuda.runtime.getDeviceProperties(0)
            info["cupy_device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            info["cc"] = f"{props['major']}.{props['minor']}"
            info["sm_count"] = props["multiProcessorCount"]
            info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
            info.setdefault("device", info["cupy_device"])
        except Exception as e:  # no CuPy or no GPU: recorded, the other stages say the rest
            info["cupy_error"] = f"{type(e).__name__}: {e}"
    info.setdefault("device", None)
    info["numba_kernel"] = _kernel_check(dry_run)
    for key, fn in (("nvvm_version", "nvvm"), ("numba_driver_version", "driver")):
        try:
            if fn == "nvvm":
                from numba.cuda.cudadrv import nvvm
                info[key] = ".".join(map(str, nvvm.NVVM().get_version()))
            else:
                from numba.cuda.cudadrv.driver import driver
                info[key] = ".".join(map(str, driver.get_version()))
        except Exception as e:
            info[key] = f"{type(e).__name__}: {str(e)[:200]}"
    print("PROBE " + json.dumps(info), flush=True)
    if info["numba_kernel"] != "ok":
        return 3
    v = info["versions"]["numba-cuda"]
    return 4 if v and tuple(int(x) for x in re.findall(r"\d+", v)[:2]) >= (0, 31) else 0


_KERNEL_SRC = """
from numba import cuda


@cuda.jit
def add_index(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += i
"""  # compiled from source so that ``cuda`` is a module global (the simulator swaps it for its own)


def _kernel_check(dry_run: bool) -> str:
    try:
        import warnings

        import numpy as np

        warnings.filterwarnings("ignore", message=".*under-utilization.*")  # 8 blocks on purpose
        ns: dict = {}
        exec(compile(_KERNEL_SRC, "<gpu_check kernel>", "exec"), ns)
        add_index, cuda = ns["add_index"], ns["cuda"]
        a = np.zeros(1000, np.float32)
        if dry_run:
            add_index[8, 128](a)
            got = a
        else:
            d = cuda.to_device(a)
            add_index[8, 128](d)
            got = d.copy_to_host()
        return "ok" if np.array_equal(got, np.arange(1000, dtype=np.float32)) else "wrong result"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:400]}"


# ----------------------------------------------------------------------------- bench
class Device:
    """CuPy arrays and CUDA events, or (dry run) NumPy arrays and a host clock."""

    def __init__(self, dry_run: bool):
        import numpy as np

        self.np, self.dry = np, dry_run
        if dry_run:
            self.xp, self.cp = np, None
        else:
            import cupy as cp

            self.xp = self.cp = cp

    def randn(self, seed, shape):
        if self.dry:
            return self.np.random.default_rng(seed).standard_normal(shape, dtype=self.np.float32)
        return self.cp.random.default_rng(seed).standard_normal(shape, dtype=self.cp.float32)

    def sync(self):
        if not self.dry:
            self.cp.cuda.get_current_stream().synchronize()

    def time_ms(self, fn, min_total_ms=None, max_reps=10):
        """Median milliseconds of fn() after one warm-up (compiles), repeated up to ``max_reps``
        times or about ``min_total_ms`` of work (300 ms, 30 in a dry run), at least 2 times."""
        min_total_ms = (30.0 if self.dry else 300.0) if min_total_ms is None else min_total_ms
        fn()
        self.sync()
        times = [self._once(fn)]
        reps = int(max(2, min(max_reps, min_total_ms / max(times[0], 1e-3))))
        times += [self._once(fn) for _ in range(reps - 1)]
        return float(self.np.median(times))

    def _once(self, fn):
        if self.dry:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        a, b = self.cp.cuda.Event(), self.cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        return self.cp.cuda.get_elapsed_time(a, b)

    def peak_bytes(self, fn):
        """Peak bytes held from CuPy's pool while fn() runs and its result lives, above what was
        held before (a memory hook sees every pool malloc and free); None in a dry run."""
        if self.dry:
            fn()
            return None
        from cupy.cuda import memory_hook

        class Peak(memory_hook.MemoryHook):
            name = "gpu_check_peak"

            def __init__(self):
                self.live, self.now, self.peak = {}, 0, 0

            def malloc_postprocess(self, **kw):
                if kw.get("mem_ptr"):  # 0: the allocation failed
                    self.live[kw["pmem_id"]] = kw["mem_size"]
                    self.now += kw["mem_size"]
                    self.peak = max(self.peak, self.now)

            def free_postprocess(self, **kw):  # blocks allocated before the hook are not counted
                self.now -= self.live.pop(kw["pmem_id"], 0)

        self.sync()
        hook = Peak()
        with hook:
            keep = fn()
            self.sync()
        del keep
        return int(hook.peak)


def torch_sdpa(dry_run: bool):
    """(torch, dtype name, backend name, context factory) or raise ImportError/RuntimeError."""
    import contextlib

    import torch

    if dry_run:
        return torch, "float32", "cpu-default", "cpu", contextlib.nullcontext
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return torch, "bfloat16", "flash", "cuda", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def bench_sdpa(T, dry_run, dtype_name=None, backend=None):
    """Forward and forward+backward ms and peak extra bytes of causal torch SDPA at (1, H, T, D)."""
    torch, dt_name, be_name, dev, ctx = torch_sdpa(dry_run)
    if dtype_name is not None:  # the float32 companion row: the memory-efficient backend
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def ctx():
            return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])

        dt_name, be_name = dtype_name, backend
    dt = getattr(torch, dt_name)
    H, D = SHAPE["H"], SHAPE["D"]
    g = torch.Generator(device=dev).manual_seed(T)
    q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=dt, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, H, T, D, device=dev, dtype=dt, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with ctx(), torch.no_grad():
            return sdpa(q, k, v, is_causal=True)

    def fwd_bwd():
        with ctx():
            out = sdpa(q, k, v, is_causal=True)
            return torch.autograd.grad(out, (q, k, v), dout)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn, max_reps=10):
        min_total_ms = 300.0 if dev == "cuda" else 30.0
        fn()
        sync()

        def once():
            if dev != "cuda":
                t = time.perf_counter()
                fn()
                return (time.perf_counter() - t) * 1e3
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)

        ts = [once()]
        reps = int(max(2, min(max_reps, min_total_ms / max(ts[0], 1e-3))))
        ts += [once() for _ in range(reps - 1)]
        return float(sorted(ts)[len(ts) // 2])

    def peak(fn):
        if dev != "cuda":
            fn()
            return None
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        keep = fn()
        sync()
        del keep
        return int(torch.cuda.max_memory_allocated() - base)

    return dict(dtype=dt_name, backend=be_name, fwd_ms=timed(fwd), fwd_bwd_ms=timed(fwd_bwd),
                fwd_peak_bytes=peak(fwd), fwd_bwd_peak_bytes=peak(fwd_bwd))


def bench_topk(dev: Device, T: int) -> dict:
    """The public op on CuPy arrays (impl auto: the CUDA kernels) or, dry, on NumPy arrays."""
    import topkattn as ta

    H, D, k = SHAPE["H"], SHAPE["D"], SHAPE["k"]
    q, kk, v, dout = (dev.randn(T * 10 + i, (1, H, T, D)) for i in range(4))
    impl = []

    def fwd():
        out, saved = ta.topk_attention_forward(q, kk, v, topk=k, causal=True)
        impl.append(getattr(saved, "impl", None))
        return out, saved

    def fwd_bwd():
        out, saved = fwd()
        return ta.topk_attention_backward(dout, saved)

    row = dict(topk_fwd_ms=dev.time_ms(fwd), topk_fwd_bwd_ms=dev.time_ms(fwd_bwd),
               topk_fwd_peak_bytes=dev.peak_bytes(fwd), topk_fwd_bwd_peak_bytes=dev.peak_bytes(fwd_bwd))
    row["topk_impl"] = impl[-1]
    row["topk_array"] = type(q).__module__.split(".")[0]
    return row


def work_counts(T: int) -> dict:
    """The least FLOPs and bytes each pass must do (B=1, H, D, k, causal, float32 top-k, bf16 SDPA)."""
    H, D, k = SHAPE["H"], SHAPE["D"], SHAPE["k"]
    pairs = T * (T + 1) / 2  # causal (query, key) pairs
    f32 = 4
    return dict(
        topk_fwd_flops=2 * H * D * pairs + 4 * H * T * k * D,  # every visible score + the k-key attend
        topk_fwd_bytes=(4 * H * T * D) * f32 + H * T * k * 8 + H * T * f32,  # q k v out, idx, lse
        topk_bwd_flops=8 * H * T * k * D,  # dq, dk, dv over the k selected keys (score recompute included)
        topk_bwd_bytes=(8 * H * T * D) * f32 + H * T * k * 8 + H * T * f32,  # q k v out dout in, dq dk dv out
        sdpa_fwd_flops=4 * H * D * pairs,  # QK^T and PV over the causal half
        sdpa_fwd_bwd_flops=4 * H * D * pairs * 3.5,  # backward ~2.5x forward (recomputed scores)
    )


def ceilings(dev: Device) -> dict:
    """Measured ceilings: device copy bandwidth (bytes read + written), FP32 GEMM (CuPy/cuBLAS),
    bf16 GEMM (torch); in a dry run the host's, small."""
    np = dev.np
    res = {}
    n = (1 << 22) if dev.dry else (1 << 28)  # float32 elements: 16 MiB dry, 1 GiB on the GPU
    a = dev.randn(1, (n,))
    b = dev.xp.empty_like(a)
    ms = dev.time_ms(lambda: dev.xp.copyto(b, a), min_total_ms=100)
    res["copy_GBps"] = 2 * a.nbytes / ms / 1e6
    m = 512 if dev.dry else 8192
    x, y = dev.randn(2, (m, m)), dev.randn(3, (m, m))
    ms = dev.time_ms(lambda: x @ y, min_total_ms=100)
    res["fp32_gemm_TFLOPs"] = 2 * m**3 / ms / 1e9
    if not dev.dry:
        try:
            import torch

            xt = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
            yt = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
            xt @ yt
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            for _ in range(10):
                xt @ yt
            ev[1].record()
            ev[1].synchronize()
            res["bf16_gemm_TFLOPs"] = 2 * m**3 * 10 / ev[0].elapsed_time(ev[1]) / 1e9
        except Exception as e:
            res["bf16_gemm_error"] = f"{type(e).__name__}: {e}"
    res["numpy"] = np.__version__
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in res.items()}


def bench(sizes: list[int], dry_run: bool) -> int:
    """Print ``CEILINGS {json}`` then one ``ROW {json}`` per size, as each finishes."""
    dev = Device(dry_run)
    try:
        ceil = ceilings(dev)
    except Exception as e:
        ceil = dict(error=f"{type(e).__name__}: {e}")
    print("CEILINGS " + json.dumps(ceil), flush=True)
    for T in sizes:
        row = dict(T=T, S=T, **SHAPE, causal=True, topk_dtype="float32")
        errors = []
        try:
            row.update(bench_topk(dev, T))
        except Exception as e:
            errors.append(f"topk: {type(e).__name__}: {str(e)[:300]}")
        _free(dev)
        try:
            s = bench_sdpa(T, dry_run)
            row.update(sdpa_dtype=s["dtype"], sdpa_backend=s["backend"], sdpa_fwd_ms=s["fwd_ms"],
                       sdpa_fwd_bwd_ms=s["fwd_bwd_ms"], sdpa_fwd_peak_bytes=s["fwd_peak_bytes"],
                       sdpa_fwd_bwd_peak_bytes=s["fwd_bwd_peak_bytes"])
        except Exception as e:
            errors.append(f"sdpa: {type(e).__name__}: {str(e)[:300]}")
        if not dry_run:
            try:
                s = bench_sdpa(T, dry_run, "float32", "efficient")
                row.update(sdpa_fp32_fwd_ms=s["fwd_ms"], sdpa_fp32_fwd_bwd_ms=s["fwd_bwd_ms"],
                           sdpa_fp32_fwd_bwd_peak_bytes=s["fwd_bwd_peak_bytes"])
            except Exception as e:
                errors.append(f"sdpa fp32: {type(e).__name__}: {str(e)[:300]}")
        _free(dev)
        try:
            row.update(derived(row, T, ceil))
        except Exception as e:
            errors.append(f"derived: {type(e).__name__}: {e}")
        row["error"] = "; ".join(errors) or None
        print("ROW " + json.dumps(row), flush=True)
    return 0


def derived(row: dict, T: int, ceil: dict) -> dict:
    """Ratios top-k / SDPA (time and peak memory) and achieved rates against the ceilings."""
    def ratio(a, b):
        x, y = row.get(a), row.get(b)
        return float(f"{x / y:.4g}") if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y > 0 else None

    w = work_counts(T)
    out = dict(fwd_ratio=ratio("topk_fwd_ms", "sdpa_fwd_ms"), fwd_bwd_ratio=ratio("topk_fwd_bwd_ms", "sdpa_fwd_bwd_ms"),
               mem_ratio=ratio("topk_fwd_bwd_peak_bytes", "sdpa_fwd_bwd_peak_bytes"),
               fwd_mem_ratio=ratio("topk_fwd_peak_bytes", "sdpa_fwd_peak_bytes"),
               # against float32 SDPA (memory-efficient backend): the same dtype as the top-k path
               fwd_ratio_fp32=ratio("topk_fwd_ms", "sdpa_fp32_fwd_ms"),
               fwd_bwd_ratio_fp32=ratio("topk_fwd_bwd_ms", "sdpa_fp32_fwd_bwd_ms"),
               mem_ratio_fp32=ratio("topk_fwd_bwd_peak_bytes", "sdpa_fp32_fwd_bwd_peak_bytes"))
    tf, tfb, sf, sfb = (row.get(k) for k in ("topk_fwd_ms", "topk_fwd_bwd_ms", "sdpa_fwd_ms", "sdpa_fwd_bwd_ms"))
    if isinstance(tf, float) and isinstance(tfb, float):
        bwd = max(tfb - tf, 1e-6)
        out["topk_bwd_ms"] = bwd
        out["bwd_ratio"] = (bwd / (sfb - sf) if isinstance(sf, float) and isinstance(sfb, float)
                            and sfb > sf else None)
        out["topk_fwd_TFLOPs"] = w["topk_fwd_flops"] / tf / 1e9
        out["topk_fwd_GBps"] = w["topk_fwd_bytes"] / tf / 1e6
        out["topk_bwd_GBps"] = w["topk_bwd_bytes"] / bwd / 1e6
        if _positive(ceil.get("fp32_gemm_TFLOPs")):
            out["topk_fwd_frac_fp32_peak"] = out["topk_fwd_TFLOPs"] / ceil["fp32_gemm_TFLOPs"]
        if _positive(ceil.get("copy_GBps")):
            out["topk_fwd_frac_copy_bw"] = out["topk_fwd_GBps"] / ceil["copy_GBps"]
            out["topk_bwd_frac_copy_bw"] = out["topk_bwd_GBps"] / ceil["copy_GBps"]
    if isinstance(sf, float):
        out["sdpa_fwd_TFLOPs"] = w["sdpa_fwd_flops"] / sf / 1e9
        if _positive(ceil.get("bf16_gemm_TFLOPs")):
            out["sdpa_fwd_frac_bf16_peak"] = out["sdpa_fwd_TFLOPs"] / ceil["bf16_gemm_TFLOPs"]
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in out.items()}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def _free(dev: Device) -> None:
    import gc

    gc.collect()
    if not dev.dry:
        dev.cp.get_default_memory_pool().free_all_blocks()
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass


# ----------------------------------------------------------------------------- the CLI of this checkout
def load_cli_main(force_shim: bool = False):
    """``topkattn.cli.main.main``; without an install (the device machine runs the bare checkout)
    the repository's cli/ folder is registered as the subpackage topkattn.cli, as the wheel does."""
    import importlib
    import importlib.util

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if not force_shim:
        try:
            return importlib.import_module("topkattn.cli.main").main
        except ImportError:
            pass
    import topkattn

    spec = importlib.util.spec_from_file_location("topkattn.cli", ROOT / "cli" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "cli")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["topkattn.cli"] = mod
    spec.loader.exec_module(mod)
    topkattn.cli = mod
    return importlib.import_module("topkattn.cli.main").main


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:
        rest = argv[1:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
        return load_cli_main()(args=rest, prog_name="topkattn")
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="all stages, gpu_check.json under --out")
    r.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check_out")
    r.add_argument("--budget", type=float, default=330.0, help="seconds for all stages (default 330)")
    r.add_argument("--deadline", type=float, default=None, help="absolute end (epoch seconds); wins over --budget")
    r.add_argument("--stages", nargs="+", default=os.environ.get("GPU_CHECK_STAGES", "").split() or None,
                   help="only these stages (default: all, or $GPU_CHECK_STAGES)")
    r.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("probe")
    p.add_argument("--dry-run", action="store_true")
    b = sub.add_parser("bench")
    b.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    b.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "probe":
        return probe(a.dry_run)
    if a.cmd == "bench":
        return bench(a.sizes, a.dry_run)
    deadline = a.deadline if a.deadline is not None else time.time() + a.budget
    res = run_all(Path(a.out).resolve(), deadline, a.dry_run, a.stages)
    print(summary_text(res), flush=True)
    ok = all(st.get("status") in ("ok", "not_run") for st in res["stages"].values())
    return 0 if ok and not res.get("interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
