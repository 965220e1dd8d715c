"""Peak RSS of loading one layer of a mixture-of-experts checkpoint vs loading the whole model, each in a fresh process.

What is measured: a Mixtral checkpoint built in code from `transformers.MixtralConfig` (random weights, no download,
float32, `save_pretrained` into a temporary folder, or `--folder` to reuse one) is loaded

* by `mmblocks.llm.load_blocks(folder, [layer], attention="causal", rope="native", final_norm="none")`, and
* by `transformers.AutoModelForCausalLM.from_pretrained(folder)` (the reference),

each in its own fresh subprocess, so no memory is shared. Both children import the same modules (torch, transformers,
mmblocks.llm) before measuring; "RSS after imports" is VmRSS at that point. The peak counter (VmHWM) is then reset
(`/proc/self/clear_refs` = 5; where that is refused, the peak is `ru_maxrss`, which includes the imports), the model
is loaded and every parameter is read once (pages in anything mmapped), and "peak RSS" is VmHWM after that. The
increase is peak - RSS after imports. The one-layer child then runs one forward on torch.randn(1, 16, hidden), outside
the measurement. `--check` adds a third subprocess that loads both and compares the loaded layer's state dict with
the full model's layer (torch.equal, tensor by tensor), kept apart from the RSS measurements.

Also printed: the checkpoint's size on disk, the bytes of one layer's tensors (from the safetensors headers) and the
first keys of layer 0 as saved (transformers 5 fuses Mixtral's experts in memory; whether it saves them fused or per
expert shows whether its conversion runs when the layer is loaded).

Usage: python bench/bench_llm_moe_load.py [--layer 7] [--layers 16] [--hidden 512] [--intermediate 512]
       [--experts 8] [--folder DIR] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

_COMMON = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from mmblocks.llm import load_blocks

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise KeyError(field)

    def touch(module):
        return sum(float(p.detach().float().sum()) for p in module.parameters())
    """
)

_MEASURE = _COMMON + textwrap.dedent(
    """
    what, folder, layer = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        peak_source = "VmHWM (reset after imports)"
    except OSError:
        peak_source = "ru_maxrss (includes imports)"
    t0 = time.perf_counter()
    if what == "blocks":
        obj = load_blocks(folder, [layer], attention="causal", rope="native", final_norm="none")
    else:
        obj = AutoModelForCausalLM.from_pretrained(folder)
    touch(obj)
    seconds = time.perf_counter() - t0
    if peak_source.startswith("VmHWM"):
        peak = status("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in obj.parameters())
    out = {"base": base, "peak": peak, "seconds": seconds, "params": params, "peak_source": peak_source}
    if what == "blocks":
        with torch.no_grad():
            y = obj(torch.randn(1, 16, obj.hidden_size))
        out["forward"] = [list(y.shape), bool(torch.isfinite(y).all())]
        out["layer_class"] = type(obj.layers[0]).__name__
        experts = [(n, p) for n, p in obj.layers[0].named_parameters() if "expert" in n]
        out["experts"] = {n: [list(p.shape), str(p.dtype)] for n, p in experts}
    print(json.dumps(out))
    """
)

_CHECK = _COMMON + textwrap.dedent(
    """
    folder, layer = sys.argv[1], int(sys.argv[2])
    blocks = load_blocks(folder, [layer], attention="causal", rope="native", final_norm="none")
    full = AutoModelForCausalLM.from_pretrained(folder)
    ours, ref = blocks.layers[0].state_dict(), full.model.layers[layer].state_dict()
    unequal = sorted(k for k in ref if k in ours and not torch.equal(ours[k], ref[k]))
    print(json.dumps({"keys": len(ref), "only_ours": sorted(set(ours) - set(ref)),
                      "only_ref": sorted(set(ref) - set(ours)), "unequal": unequal}))
    """
)


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child {args[:1]} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build(folder: Path, args: argparse.Namespace) -> float:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    del model
    return time.perf_counter() - t0


def _headers(folder: Path) -> dict[str, tuple[int, str, list[int]]]:
    """key -> (bytes, dtype, shape) of every tensor in the folder's safetensors files, from their headers only."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                out[key] = (end - start, info["dtype"], info["shape"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=7, help="the layer load_blocks loads")
    parser.add_argument("--layers", type=int, default=16, help="num_hidden_layers of the built checkpoint")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=512, help="each expert's intermediate size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--folder", type=Path, help="an existing Mixtral folder to reuse (else one is built)")
    parser.add_argument("--check", action="store_true", help="also compare the loaded layer with the full model's")
    args = parser.parse_args()
    t_start = time.perf_counter()

    tmp = None
    if args.folder is not None and (args.folder / "config.json").exists():
        folder = args.folder
        print(f"reusing {folder}")
    else:
        if args.folder is not None:
            folder = args.folder
            folder.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mixtral_bench_")
            folder = Path(tmp.name)
        seconds = _build(folder, args)
        print(f"built and saved a random Mixtral checkpoint in {seconds:.1f} s: {folder}")

    try:
        import transformers

        mib = 2**20
        config = json.loads((folder / "config.json").read_text())
        tensors = _headers(folder)
        disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        prefix = f"model.layers.{args.layer}."
        layer_bytes = sum(b for k, (b, _, _) in tensors.items() if k.startswith(prefix))
        print(
            f"transformers {transformers.__version__}; {config['model_type']}: {config['num_hidden_layers']} layers, "
            f"hidden {config['hidden_size']}, {config['num_local_experts']} experts x intermediate "
            f"{config['intermediate_size']}, {config.get('dtype', config.get('torch_dtype'))}"
        )
        print(
            f"checkpoint on disk: {disk / mib:.1f} MiB ({len(tensors)} tensors); layer {args.layer}'s tensors: "
            f"{layer_bytes / mib:.1f} MiB ({sum(k.startswith(prefix) for k in tensors)} tensors)"
        )
        layer0 = sorted(k for k in tensors if k.startswith("model.layers.0."))
        fused = any("experts.gate_up_proj" in k for k in layer0)
        per_expert = any(".experts.0." in k for k in layer0)
        layout = "fused experts" if fused else "per-expert tensors" if per_expert else "unrecognised"
        print(f"saved key layout: {layout}; layer 0 has {len(layer0)} keys, the first ones (sorted):")
        for key in layer0[:8]:
            _, dtype, shape = tensors[key]
            print(f"  {key:<58} {dtype} {shape}")

        blocks = _child(_MEASURE, "blocks", str(folder), str(args.layer))
        full = _child(_MEASURE, "full", str(folder), str(args.layer))

        print(f"\npeak from: {blocks['peak_source']}")
        head = (
            f"{'what':<40} {'RSS after imports (MiB)':>24} {'peak RSS (MiB)':>15} {'increase (MiB)':>15} {'load s':>7}"
        )
        print(head)
        print("-" * len(head))
        rows = (
            (f"load_blocks(layers=[{args.layer}])", blocks),
            ("AutoModelForCausalLM.from_pretrained", full),
        )
        for name, r in rows:
            print(
                f"{name:<40} {r['base'] / mib:>24.1f} {r['peak'] / mib:>15.1f} "
                f"{(r['peak'] - r['base']) / mib:>15.1f} {r['seconds']:>7.2f}"
            )
        inc_blocks, inc_full = blocks["peak"] - blocks["base"], full["peak"] - full["base"]
        print(
            f"\nratio full increase / one-layer increase: {inc_full / inc_blocks:.1f}x "
            f"(checkpoint / one layer on disk: {disk / layer_bytes:.1f}x); "
            f"one-layer increase / layer bytes: {inc_blocks / layer_bytes:.2f}, "
            f"full increase / checkpoint bytes: {inc_full / disk:.2f}"
        )
        print(
            f"params: load_blocks {blocks['params']:,}, full {full['params']:,}; loaded layer: "
            f"{blocks['layer_class']}, experts as {blocks['experts']}"
        )
        shape, finite = blocks["forward"]
        print(f"forward on randn(1, 16, {config['hidden_size']}): output {tuple(shape)}, finite: {finite}")

        if args.check:
            c = _child(_CHECK, str(folder), str(args.layer))
            ok = not (c["only_ours"] or c["only_ref"] or c["unequal"])
            print(
                f"check vs full model's layer {args.layer}: {c['keys']} tensors, "
                + ("all equal (torch.equal)" if ok else f"DIFFERENT: {c}")
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
