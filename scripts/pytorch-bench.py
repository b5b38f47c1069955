#!/usr/bin/env python3
"""PyTorch side of `attractor bench`: the same cases on the same shapes, for side-by-side ratios.

SPEC.md §7's PyTorch figures were taken once, on an idle machine. A shared CPU's speed drifts by
±20 % within minutes, so a ratio is only honest when both sides run in the same minutes: run this
script and `attractor bench` alternately; `attractor bench --pytorch FILE` takes its ratios from
the last line this script appended to FILE for each (case, size).

What it times (mirrors `src/bench.rs`):
  ti      CLIP text encoder + UNet forward at batch 1 on "a photo of a <v*>" (the learned row at
          position 5, injected after the token embedding), MSE against random noise at t = 500,
          backward to that one row only (every weight frozen);
  sample  UNet forward on batch 2 with a random context, classifier-free guidance at 7.5, no grad.
Random weights (diffusers/transformers initialisers) from the configs in `configs/sd15`, f32, the
default attention processor (PyTorch's SDPA). Each case runs in its own process, so its peak RSS
(VmHWM, weights included) is its own; one warm-up run, then the median of --runs.

Needs: torch, diffusers, transformers (e.g. torch 2.15, diffusers 0.42.1, transformers 5.24, the
versions behind SPEC.md §7). Nothing is downloaded: the models are built from the configs.

    python3 scripts/pytorch-bench.py --sizes 256,512 --cases ti,sample --runs 3 --out pt.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "sd15")


def vm_hwm_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return None


def run_case(case, size, runs, seed):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(os.path.join(CONFIGS, "unet"))
    ).eval()
    unet.requires_grad_(False)
    text_cfg = CLIPTextConfig.from_json_file(os.path.join(CONFIGS, "text_encoder", "config.json"))
    te = CLIPTextModel(text_cfg).eval() if case == "ti" else None
    if te is not None:
        te.requires_grad_(False)

    h = size // 8
    batch = 2 if case == "sample" else 1
    latents = torch.randn(batch, unet.config.in_channels, h, h)
    target = torch.randn(batch, unet.config.out_channels, h, h)
    t = torch.full((batch,), 500, dtype=torch.long)
    length = text_cfg.max_position_embeddings
    # "a photo of a <v*>": BOS, four words, the placeholder (any id: its row is replaced), EOS pad.
    ids = [49406, 320, 1125, 539, 320, 0] + [49407] * (length - 6)
    ids = torch.tensor([ids])
    pos = 5
    context = torch.randn(2, length, text_cfg.hidden_size)

    def once():
        if case == "sample":
            t0 = time.perf_counter()
            with torch.no_grad():
                out = unet(latents, t, encoder_hidden_states=context).sample
                u, c = out[:1], out[1:]
                eps = u + (c - u) * 7.5
            assert torch.isfinite(eps).all()
            return time.perf_counter() - t0, 0.0
        row = (torch.randn(1, text_cfg.hidden_size) * 0.02).requires_grad_(True)

        def inject(_module, _inputs, out):
            return torch.cat([out[:, :pos], row.unsqueeze(0), out[:, pos + 1 :]], dim=1)

        handle = te.get_input_embeddings().register_forward_hook(inject)
        try:
            t0 = time.perf_counter()
            ctx = te(ids).last_hidden_state
            out = unet(latents, t, encoder_hidden_states=ctx).sample
            loss = torch.nn.functional.mse_loss(out, target)
            assert torch.isfinite(loss)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        finally:
            handle.remove()
        assert row.grad is not None and row.grad.abs().max() > 0
        return t1 - t0, t2 - t1

    once()  # warm-up: first-touch of the weights, allocator growth
    times = [once() for _ in range(runs)]
    totals = [f + b for f, b in times]
    med = statistics.median(totals)
    i = totals.index(sorted(totals)[(len(totals) - 1) // 2])
    return {
        "case": case,
        "size": size,
        "runs": runs,
        "median_s": med,
        "forward_s": times[i][0],
        "backward_s": times[i][1],
        "all_s": totals,
        "peak_gib": vm_hwm_gib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--cases", default="ti,sample")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append one JSON line per case to this file")
    p.add_argument("--child", nargs=2, metavar=("CASE", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_case(a.child[0], int(a.child[1]), a.runs, a.seed)))
        return
    for size in (int(s) for s in a.sizes.split(",")):
        for case in a.cases.split(","):
            if case not in ("ti", "sample"):
                sys.exit(f"unknown case {case!r}: this script times ti and sample")
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--runs", str(a.runs), "--seed", str(a.seed),
                   "--child", case, str(size)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["load"] = load
            print(f"{case:7} {size:4} px  median {row['median_s']:6.2f} s "
                  f"(fwd {row['forward_s']:.2f} / bwd {row['backward_s']:.2f})  "
                  f"peak {row['peak_gib']:.2f} GiB  load {load:.2f}", flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
