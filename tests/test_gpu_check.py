"""benchmarks/gpu_check.py, issue 20's device run, tested on the CPU: its --dry-run (the same stages
at tiny sizes, the CUDA simulator, NumPy arrays) writes a JSON of the promised schema with
measured numbers, and its parsers read pytest's junit XML and console output right."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load()

CASE = '<testcase classname="{}" name="{}" time="0.01">{}</testcase>'
JUNIT = ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
         '<testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6" time="3.1">'
         + CASE.format("", "tests.test_cuda_gpu", '<skipped message="collection skipped">'
                       "('/w/tests/test_cuda_gpu.py', 20, 'Skipped: real-GPU tests (the simulator is on)')</skipped>")
         + CASE.format("tests.test_cuda_kernels", "test_a[float32]", "")
         + CASE.format("tests.test_cuda_kernels", "test_b", '<failure message="AssertionError: Not equal to '
                       'tolerance rtol=1e-05&#10;second line">trace</failure>')
         + CASE.format("tests.test_cuda_kernels", "test_c", '<error message="failed on setup with &quot;'
                       'CudaAPIError: [700] illegal address&quot;">trace</error>')
         + CASE.format("tests.test_cuda_kernels", "test_d", '<skipped type="pytest.skip" message="needs a GPU">'
                       "/w/tests/test_cuda_kernels.py:491: needs a GPU</skipped>")
         + CASE.format("tests.test_cuda_kernels", "test_e", '<skipped type="pytest.xfail" message="known" />')
         + "</testsuite></testsuites>\n")


def test_parse_junit_counts_failures_errors_skips(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    r = gc.parse_junit(path)
    assert (r["passed"], r["failed"], r["errors"], r["skipped"], r["xfailed"], r["total"]) == (1, 2, 1, 2, 1, 6)
    assert r["source"] == "junit"
    tests = {f["test"]: f for f in r["failures"]}
    assert tests["tests.test_cuda_kernels::test_b"]["message"] == "AssertionError: Not equal to tolerance rtol=1e-05"
    assert tests["tests.test_cuda_kernels::test_c"]["kind"] == "error"
    assert "illegal address" in tests["tests.test_cuda_kernels::test_c"]["message"]
    assert r["skip_reasons"] == {"real-GPU tests (the simulator is on)": 1,
                                 "/w/tests/test_cuda_kernels.py:491: needs a GPU": 1}


def test_pytest_result_falls_back_to_the_console_when_the_xml_is_missing_or_truncated(tmp_path):
    log = ("tests/test_x.py::test_a PASSED [ 50%]\n"
           "tests/test_x.py::test_b[1] FAILED [100%]\n"
           "=========== 1 failed, 1 passed, 2 skipped, 1 error, 3 deselected in 4.20s ===========\n")
    r = gc.pytest_result(tmp_path / "missing.xml", log)
    assert (r["source"], r["passed"], r["failed"], r["errors"], r["skipped"], r["total"]) == ("summary", 1, 2, 1, 2, 5)
    assert [f["test"] for f in r["failures"]] == ["tests/test_x.py::test_b[1]"]
    (tmp_path / "cut.xml").write_text(JUNIT[:300])
    assert gc.pytest_result(tmp_path / "cut.xml", log)["source"] == "summary"


def test_console_without_summary_counts_verbose_lines_with_and_without_xdist():
    log = ("[gw0] [ 10%] PASSED tests/test_x.py::test_a\n"
           "[gw1] [ 20%] FAILED tests/test_x.py::test_b[2-float32]\n"
           "[gw1] [ 30%] SKIPPED tests/test_x.py::test_c\n"
           "tests/test_y.py::test_d PASSED [ 40%]\n"
           "tests/test_y.py::test_e ERROR [ 50%]\n"
           "!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!\n")
    r = gc.parse_pytest_output(log)
    assert (r["source"], r["passed"], r["failed"], r["errors"], r["skipped"], r["total"]) == ("verbose", 2, 2, 1, 1, 5)
    assert {f["test"] for f in r["failures"]} == {"tests/test_x.py::test_b[2-float32]", "tests/test_y.py::test_e"}


def test_json_lines_keep_rows_printed_before_a_crash():
    text = 'noise\nROW {"T": 1}\nROW {"T": 2\nROW {"T": 3}\nTraceback ...\n'
    assert gc.json_lines(text, "ROW ") == [{"T": 1}, {"T": 3}]
    assert gc.last_json_line('{"a": 1}\nprogress\n{"b": 2}\nbye\n') == {"b": 2}
    assert gc.last_json_line("nothing here") is None


def test_stage_timeout_earlier_stages_come_first():
    assert gc.stage_timeout(170, 320, 140) == 170  # room for everyone
    assert gc.stage_timeout(150, 200, 80) == 120  # the later stages' reserves are kept
    assert gc.stage_timeout(170, 100, 140) == 30  # reserves give way to an earlier stage (the floor)
    assert gc.stage_timeout(170, 12, 140) == 12
    assert gc.stage_timeout(60, -3, 0) == 0


def test_run_stage_times_out_and_stops_the_process_group(tmp_path):
    log = tmp_path / "s.log"
    t = time.monotonic()
    info = gc.run_stage("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                        log, 2, dict(os.environ))
    assert info["status"] == "timeout" and time.monotonic() - t < 30
    assert "started" in gc.stage_text(log, "sleepy")
    info = gc.run_stage("quick", [sys.executable, "-c", "raise SystemExit(3)"], log, 30, dict(os.environ), append=True)
    assert info["status"] == "failed" and info["rc"] == 3
    assert "started" not in gc.stage_text(log, "quick") and "sleepy" in log.read_text()


def test_cli_loads_from_the_checkout_without_an_install():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "m = gpu_check.load_cli_main(force_shim=True); print(m.name, sys.modules['topkattn.cli.main'].__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    name, path = r.stdout.split()
    assert name == "main" and Path(path) == ROOT / "cli" / "main.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path_factory.mktemp("gpu_check_work")))
    for name in ("NUMBA_ENABLE_CUDASIM", "GPU_CHECK_STAGES"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, str(SCRIPT), "run", "--dry-run", "--out", str(out), "--budget", "240"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    return r, out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_writes_the_schema_with_measured_numbers(dry_run):
    r, out, res = dry_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpu_check (DRY RUN)" in r.stdout
    assert res["dry_run"] is True and res["device"] is None  # no GPU name is made up
    assert res["env"]["numba_kernel"] == "ok" and res["env"]["simulator"] == "1"
    assert {s: v["status"] for s, v in res["stages"].items()} == dict.fromkeys(
        ["probe", "pytest_cuda", "bench", "train_toy", "eval", "pytest_extra"], "ok")
    p = res["pytest_cuda"]
    assert p["source"] == "junit" and p["complete"] and p["failed"] == 0
    assert p["passed"] == 4 and p["skipped"] == 1  # test_cuda_gpu.py skips itself under the simulator
    assert res["pytest_extra"]["total"] >= 1
    t = res["train_toy_gpu"]
    assert 0 <= t["accuracy"] <= 1 and t["seconds"] > 0 and t["steps"] == 10 and t["device"] == "cpu"
    assert 0 <= res["eval"]["accuracy"] <= 1 and res["eval"]["retriever"] == "exact"
    assert res["ceilings"]["copy_GBps"] > 0 and res["ceilings"]["fp32_gemm_TFLOPs"] > 0
    rows = res["topk_vs_sdpa"]
    assert [row["T"] for row in rows] == list(gc.DRY_SIZES)
    for row in rows:
        assert {"T", "fwd_ratio", "fwd_bwd_ratio", "mem_ratio"} <= set(row)
        assert (row["H"], row["D"], row["k"], row["causal"]) == (8, 64, 8, True)
        assert row["topk_fwd_ms"] > 0 and row["topk_fwd_bwd_ms"] > 0 and row["topk_array"] == "numpy"
        assert row["mem_ratio"] is None  # no device pool on the CPU: not measured, not invented
        if row["error"] is None:  # torch present: SDPA on the CPU, ratios from the measured times
            assert row["fwd_ratio"] == pytest.approx(row["topk_fwd_ms"] / row["sdpa_fwd_ms"], rel=1e-3)
            assert row["fwd_bwd_ratio"] == pytest.approx(row["topk_fwd_bwd_ms"] / row["sdpa_fwd_bwd_ms"], rel=1e-3)
        else:
            assert "sdpa" in row["error"] and row["fwd_ratio"] is None
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and "gpu_check.json" in names  # the device returns at most 8 files
    assert all(n.replace(".", "").replace("_", "").replace("-", "").isalnum() for n in names)
