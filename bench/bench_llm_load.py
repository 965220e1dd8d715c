"""Loading one block vs loading the whole model: wall time and RSS growth, each in a fresh process.

Goal: RSS growth of `load_blocks(..., layers=[-1])` <= 1/10 of `AutoModelForCausalLM.from_pretrained`.
Usage: python bench/bench_llm_load.py [--source smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil, torch
    import transformers
    from transformers import AutoModelForCausalLM
    from mmblocks.llm import load_blocks, resolve_source
    what, source = sys.argv[1], sys.argv[2]
    folder = resolve_source(source).path  # converts once if needed, before measuring
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    done = False
    def watch():
        while not done:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    before = proc.memory_info().rss
    t = threading.Thread(target=watch); t.start()
    t0 = time.perf_counter()
    if what == "blocks":
        obj = load_blocks(source, [-1])
    else:
        obj = AutoModelForCausalLM.from_pretrained(folder)
    sum(float(p.sum()) for p in obj.parameters())  # page everything in
    dt = time.perf_counter() - t0
    done = True; t.join()
    after = proc.memory_info().rss
    print(json.dumps({"seconds": dt, "rss_growth": after - before, "peak_growth": max(peak[0], after) - before,
                      "params": sum(p.numel() for p in obj.parameters())}))
    """
)


def _run(what: str, source: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, what, source], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="smollm2-135m")
    args = parser.parse_args()
    blocks, full = _run("blocks", args.source), _run("full", args.source)
    mib = 2**20
    print(f"{'load':<28} {'seconds':>8} {'RSS growth MiB':>15} {'peak growth MiB':>16} {'params':>12}")
    for name, r in (("load_blocks(layers=[-1])", blocks), ("from_pretrained (full)", full)):
        print(
            f"{name:<28} {r['seconds']:>8.2f} {r['rss_growth'] / mib:>15.1f} {r['peak_growth'] / mib:>16.1f} "
            f"{r['params']:>12,}"
        )
    print(
        f"ratio blocks/full: time {blocks['seconds'] / full['seconds']:.3f}, "
        f"RSS growth {blocks['rss_growth'] / full['rss_growth']:.3f}, "
        f"peak growth {blocks['peak_growth'] / full['peak_growth']:.3f}"
    )


if __name__ == "__main__":
    main()
