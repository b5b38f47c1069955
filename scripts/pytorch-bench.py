#!/usr/bin/env python3
"""PyTorch side of `attractor bench`: the same cases on the same shapes, for side-by-side ratios.

SPEC.md §7's PyTorch figures were taken once, on an idle machine. A shared CPU's speed drifts by
±20 % within minutes, so a ratio is only honest when both sides run in the same minutes: run this
script and `attractor bench` alternately; `attractor bench --pytorch FILE` takes its ratios from
the last line this script appended to FILE for each (case, size).

What it times (mirrors `src/bench.rs`; t = 500, every weight frozen, backward to the learned
rows only, injected after the token embedding):
  ti      CLIP text encoder + UNet forward at batch 1 on "a photo of a <v*>" (the learned row at
          position 5), MSE against random noise, backward;
  neti    as ti, with one learned row per cross-attention layer: the text encoder on the 16
          copies of the prompt in one batch, each cross-attention layer reading its own copy
          (an attention processor per layer, as NeTI's code does); no mapper and no bypass, whose
          cost is negligible, so this is a lower bound on a NeTI step;
  ti+     the three prompt pools of one image, "a photo of a <v*>", "a photo of a dog in the
          <a*>", "a photo of a <v*> in the <a*>": the text encoder on 3 prompts, the UNet on batch
          3 (one noised latent), the masked subject and background MSEs and the joint MSE, backward
          to the rows of <v*> and <a*>; no InfoNCE and no optimizer update (a lower bound on
          `attractor train --method ti+`'s step, which the Rust bench times whole);
  neti+   as ti+, with 16 rows per token: the text encoder on 48 prompts, per-layer contexts;
  sample  UNet forward on batch 2 with a random context, classifier-free guidance at 7.5, no grad.
Random weights (diffusers/transformers initialisers) from the configs in `configs/sd15`, f32, the
default attention processor (PyTorch's SDPA). Each case runs in its own process, so its peak RSS
(VmHWM, weights included) is its own; one warm-up run, then the median of --runs.

Needs: torch, diffusers, transformers (e.g. torch 2.15, diffusers 0.42.1, transformers 5.24, the
versions behind SPEC.md §7). Nothing is downloaded: the models are built from the configs.

    python3 scripts/pytorch-bench.py --sizes 256,512 --cases ti,sample --runs 3 --out pt.json
    python3 scripts/pytorch-bench.py --sizes 256 --cases ti+,neti+ --runs 2 --out pt.json
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


# CLIP ids of the prompts (BOS, words, the learned token's slot, then EOS padding to 77). The
# slot's id is irrelevant: its row is replaced after the token embedding.
BOS, EOS, SLOT = 49406, 49407, 0
PROMPTS = {
    # "a photo of a <v*>"
    "subject": ([BOS, 320, 1125, 539, 320, SLOT], {"v": 5}),
    # "a photo of a dog in the <a*>"
    "background": ([BOS, 320, 1125, 539, 320, 1929, 530, 518, SLOT], {"a": 8}),
    # "a photo of a <v*> in the <a*>"
    "joint": ([BOS, 320, 1125, 539, 320, SLOT, 530, 518, SLOT], {"v": 5, "a": 8}),
}
CASES = {
    # case: (prompts, one context per cross-attention layer?)
    "ti": (["subject"], False),
    "neti": (["subject"], True),
    "ti+": (["subject", "background", "joint"], False),
    "neti+": (["subject", "background", "joint"], True),
    "sample": ([], False),
}


def attn2_order(unet):
    """The cross-attention processors' names in forward order (down, mid, up), as SPEC.md §4."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(n):
        bits = n.split(".")
        return (part[bits[0]], [int(b) for b in bits if b.isdigit()])

    return sorted(names, key=key)


def run_case(case, size, runs, seed):
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(os.path.join(CONFIGS, "unet"))
    ).eval()
    unet.requires_grad_(False)
    text_cfg = CLIPTextConfig.from_json_file(os.path.join(CONFIGS, "text_encoder", "config.json"))
    prompts, per_layer = CASES[case]
    te = CLIPTextModel(text_cfg).eval() if prompts else None
    if te is not None:
        te.requires_grad_(False)

    # NeTI-style cases: every cross-attention layer reads its own context from `store`.
    store = {}
    order = attn2_order(unet)
    layers = len(order) if per_layer else 1
    if per_layer:

        class LayerContext(AttnProcessor2_0):
            def __init__(self, l):
                super().__init__()
                self.l = l

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
                return super().__call__(attn, hidden_states, store["ctx"][self.l], *args, **kwargs)

        unet.set_attn_processor(
            {n: LayerContext(order.index(n)) if n in order else AttnProcessor2_0()
             for n in unet.attn_processors}
        )

    h = size // 8
    n = len(prompts)
    batch = 2 if case == "sample" else n
    # One image noised once, predicted under each prompt (the + cases' three pools).
    latents = torch.randn(1, unet.config.in_channels, h, h).expand(batch, -1, -1, -1)
    target = torch.randn(1, unet.config.out_channels, h, h).expand(batch, -1, -1, -1)
    t = torch.full((batch,), 500, dtype=torch.long)
    mask = torch.zeros(1, 1, h, h)
    mask[..., h // 4 : 3 * h // 4, h // 4 : 3 * h // 4] = 1.0
    length = text_cfg.max_position_embeddings
    ids = torch.tensor(
        [PROMPTS[p][0] + [EOS] * (length - len(PROMPTS[p][0])) for p in prompts for _ in range(layers)]
    ) if prompts else None
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
        # The learned rows: one per token (and per layer in the NeTI cases), every weight frozen.
        tokens = sorted({tok for p in prompts for tok in PROMPTS[p][1]})
        rows = {tok: (torch.randn(layers, text_cfg.hidden_size) * 0.02).requires_grad_(True)
                for tok in tokens}
        bi, pi, vals = [], [], []
        for j, p in enumerate(prompts):
            for tok, pos in PROMPTS[p][1].items():
                for l in range(layers):
                    bi.append(j * layers + l)
                    pi.append(pos)
                    vals.append(rows[tok][l])
        index = (torch.tensor(bi), torch.tensor(pi))

        def inject(_module, _inputs, out):
            return out.index_put(index, torch.stack(vals))

        handle = te.get_input_embeddings().register_forward_hook(inject)
        try:
            t0 = time.perf_counter()
            enc = te(ids).last_hidden_state  # [n * layers, 77, D]
            if per_layer:
                enc = enc.view(n, layers, length, -1)
                store["ctx"] = [enc[:, l] for l in range(layers)]
                ctx = store["ctx"][0]
            else:
                ctx = enc
            out = unet(latents, t, encoder_hidden_states=ctx).sample
            if n == 3:
                loss = (F.mse_loss(out[0:1] * mask, target[0:1] * mask)
                        + F.mse_loss(out[1:2] * (1 - mask), target[1:2] * (1 - mask))
                        + F.mse_loss(out[2:3], target[2:3]))
            else:
                loss = F.mse_loss(out, target)
            assert torch.isfinite(loss)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        finally:
            handle.remove()
            store.clear()
        for r in rows.values():
            # Every layer's row must reach the loss: in the NeTI cases, that each cross-attention
            # layer read its own context.
            assert r.grad is not None and (r.grad.abs().amax(dim=1) > 0).all()
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
            if case not in CASES:
                sys.exit(f"unknown case {case!r}: this script times {', '.join(CASES)}")
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
