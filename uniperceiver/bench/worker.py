"""Run one benchmark case in this process and print its result as one JSON line.

`python -m uniperceiver.bench.worker '<json case>'`: a fresh process per case keeps peak-memory
figures separate (a process's resident high-water mark only ever grows).

`python -m uniperceiver.bench.worker --serve '<json case>'`: build and warm up (compile), print
`READY {...}`, then time the case once per `time` line read on standard input (`RESULT {...}`)
until `exit`: cases can compile side by side and still be timed one at a time (`timing.ServedCase`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

from uniperceiver.bench.train_step import StepCase, prepare_step_case, run_step_case, time_step_case


def main(argv: list[str]) -> int:
    serve = bool(argv) and argv[0] == "--serve"
    spec = json.loads(argv[1 if serve else 0])
    device = torch.device(spec.pop("device", "cpu"))
    warmup = spec.pop("warmup", 1)
    repeats = spec.pop("repeats", 3)
    threads = spec.pop("threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    if not serve:
        result = run_step_case(StepCase(**spec), device, warmup=warmup, repeats=repeats)
        print("RESULT " + json.dumps(asdict(result)))
        return 0
    prepared = prepare_step_case(StepCase(**spec), device, warmup=warmup)
    prepared.release_memory()
    print("READY " + json.dumps({"warmup_s": prepared.warmup_s}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            break
        if command != "time":
            raise SystemExit(f"unknown command {command!r}: expected time or exit")
        # One untimed step first: the device memory handed back while waiting is allocated again.
        result = time_step_case(prepared, repeats=repeats, warmup=1)
        print("RESULT " + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
