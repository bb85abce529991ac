"""Run one benchmark case in this process and print its result as one JSON line.

`python -m uniperceiver.bench.worker '<json case>'`: a fresh process per case keeps peak-memory
figures separate (a process's resident high-water mark only ever grows).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

from uniperceiver.bench.train_step import StepCase, run_step_case


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    device = torch.device(spec.pop("device", "cpu"))
    warmup = spec.pop("warmup", 1)
    repeats = spec.pop("repeats", 3)
    threads = spec.pop("threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    result = run_step_case(StepCase(**spec), device, warmup=warmup, repeats=repeats)
    print("RESULT " + json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
