#!/usr/bin/env python3
"""PyTorch side of `attractor bench`: the same cases on the same shapes, for side-by-side ratios.

SPEC.md §7's PyTorch figures were taken once, on an idle machine. A shared CPU's speed drifts by
±20 % within minutes, so a ratio is only honest when both sides run in the same minutes: run this
script and `attractor bench` alternately; `attractor bench --pytorch FILE` takes its ratios from
the last line this script appended to FILE for each (case, size).

What it times: first the cases of `src/bench.rs` (t = 500, every weight frozen, backward to the
learned rows only, injected after the token embedding):
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

  generate  one guided sampling step of N images (--batches, default 1,4,8) through diffusers'
          StableDiffusionPipeline itself: num_images_per_prompt=N, num_inference_steps=1, DDIM
          (the configs/sd15 scheduler), guidance 7.5, output_type="latent" (no VAE decode), the
          prompt's embeddings passed in (no text encoding: once per image, not per step), as
          `attractor bench --cases generate` times StableDiffusion::denoise. Its lines carry
          "batch"; `attractor bench --pytorch` pairs them by (size, batch).

The weight-training baselines: one whole training step (forward, backward, clip_grad_norm_(1.0),
AdamW step, zero_grad) as diffusers' example trainers take it at their defaults, with prior
preservation (instance prompts first, then class prompts, as their collate_fn batches them), DDPM
add_noise at random timesteps from the `configs/sd15` scheduler, random latents in place of the
VAE encode (frozen, as the ti cases leave it out), no gradient checkpointing; the AdamW exists
before the warm-up step, which allocates its state:
  dreambooth        examples/dreambooth/train_dreambooth.py: the frozen text encoder (no grad) on
                    "a photo of sks dog" and "a photo of dog", every UNet weight trained: UNet
                    batch 2, mse(instance) + 1.0 * mse(prior), AdamW (lr 5e-6, wd 1e-2) over the
                    whole UNet, zero_grad(set_to_none=False) (the script's default); weights,
                    grads and Adam moments are ~14 GB;
  dreambooth-lora   examples/dreambooth/train_dreambooth_lora.py: the UNet frozen, peft LoRA
                    (r 4, alpha 4, gaussian init) added with unet.add_adapter on to_q/to_k/to_v/
                    to_out.0 (128 modules), the same batch-2 step with AdamW (lr 1e-4) over the
                    LoRA weights only;
  custom-diffusion  examples/custom_diffusion/train_custom_diffusion.py (freeze_model crossattn_kv):
                    CustomDiffusionAttnProcessor2_0 on every attention as the script installs it
                    (the 16 cross-attentions' to_k/to_v copied into trained K/V weights, the
                    self-attentions untrained), the text encoder frozen but run with grad on
                    "photo of a <new1> dog" x2 and "photo of a dog" x2 (train_batch_size 2, as
                    its README), <new1>'s row learned (injected after the token embedding as in
                    ti, at position 4), UNet batch 4, the script's masked instance MSE (mask all
                    ones) + 1.0 * prior MSE, AdamW (lr 1e-5 * 2 * 2, --scale_lr) over the 32 K/V
                    weights and the row. The script itself trains the whole token-embedding
                    matrix, zeroing every other row's grad: that dense 49409x768 grad and its
                    AdamW update are not timed here.
Their lines carry optimizer_s (clip + step + zero_grad) beside forward_s (text encoder, UNet,
loss) and backward_s; median_s is the whole step.

Random weights (diffusers/transformers initialisers) from the configs in `configs/sd15`, f32, the
default attention processor (PyTorch's SDPA) unless a case says otherwise. Each case runs in its
own process, so its peak RSS (VmHWM, weights included) is its own; one warm-up run, then the
median of --runs.

Needs: torch, diffusers, transformers (e.g. torch 2.15, diffusers 0.42.1, transformers 5.24, the
versions behind SPEC.md §7), and peft for dreambooth-lora (e.g. 0.21.2). Nothing is downloaded:
the models are built from the configs.

    python3 scripts/pytorch-bench.py --sizes 256,512 --cases ti,sample --runs 3 --out pt.json
    python3 scripts/pytorch-bench.py --sizes 256 --cases ti+,neti+ --runs 2 --out pt.json
    python3 scripts/pytorch-bench.py --sizes 512 --cases dreambooth-lora,custom-diffusion,dreambooth \\
        --runs 2 --out pt.json
    python3 scripts/pytorch-bench.py --sizes 256,512 --cases generate --batches 1,4,8 --out pt.json
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
# The weight-training baselines (run_baseline): "a photo of sks dog" / "a photo of dog" for
# DreamBooth; "photo of a <new1> dog" (the learned row at position 4) / "photo of a dog" for
# Custom Diffusion.
DREAMBOOTH_PROMPTS = [[BOS, 320, 1125, 539, 48136, 1929], [BOS, 320, 1125, 539, 1929]]
CUSTOM_PROMPTS = [[BOS, 1125, 539, 320, SLOT, 1929], [BOS, 1125, 539, 320, 1929]]
CUSTOM_SLOT = 4
BASELINES = ("dreambooth", "dreambooth-lora", "custom-diffusion")
GENERATE = "generate"


def run_generate(size, batch, runs, seed):
    """One guided DDIM step of `batch` images through StableDiffusionPipeline (see the doc)."""
    import torch
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(os.path.join(CONFIGS, "unet"))
    ).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(CONFIGS, "vae"))).eval()
    text_cfg = CLIPTextConfig.from_json_file(os.path.join(CONFIGS, "text_encoder", "config.json"))
    te = CLIPTextModel(text_cfg).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(CONFIGS, "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    length = text_cfg.max_position_embeddings
    ids = torch.tensor([[BOS, 320, 1125, 539, 320, 1929] + [EOS] * (length - 6)])
    with torch.no_grad():
        cond = te(ids).last_hidden_state
        uncond = te(torch.tensor([[BOS] + [EOS] * (length - 1)])).last_hidden_state

    def once():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_images_per_prompt=batch,
                       num_inference_steps=1, guidance_scale=7.5, height=size, width=size,
                       output_type="latent").images
        assert out.shape[0] == batch and torch.isfinite(out).all()
        return time.perf_counter() - t0

    once()  # warm-up
    totals = [once() for _ in range(runs)]
    return {
        "case": GENERATE,
        "size": size,
        "batch": batch,
        "runs": runs,
        "median_s": statistics.median(totals),
        "forward_s": statistics.median(totals),
        "backward_s": 0.0,
        "all_s": totals,
        "peak_gib": vm_hwm_gib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def attn2_order(unet):
    """The cross-attention processors' names in forward order (down, mid, up), as SPEC.md §4."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(n):
        bits = n.split(".")
        return (part[bits[0]], [int(b) for b in bits if b.isdigit()])

    return sorted(names, key=key)


def inject_rows(te, batch_index, positions, rows):
    """Replace the token embeddings at (batch_index[i], positions[i]) by rows[i], in the graph, so
    that the rows (and only they, in a frozen text encoder) get gradients."""
    import torch

    index = (torch.tensor(batch_index), torch.tensor(positions))

    def inject(_module, _inputs, out):
        return out.index_put(index, torch.stack(rows))

    return te.get_input_embeddings().register_forward_hook(inject)


def run_case(case, size, runs, seed):
    if case in BASELINES:
        return run_baseline(case, size, runs, seed)
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
        handle = inject_rows(te, bi, pi, vals)
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


def run_baseline(case, size, runs, seed):
    """One whole training step of a diffusers example trainer (the module docstring's
    dreambooth, dreambooth-lora, custom-diffusion), timed as forward, backward and optimizer."""
    import itertools

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(os.path.join(CONFIGS, "unet"))
    )
    text_cfg = CLIPTextConfig.from_json_file(os.path.join(CONFIGS, "text_encoder", "config.json"))
    te = CLIPTextModel(text_cfg).eval()
    te.requires_grad_(False)
    # DDPMScheduler.from_pretrained(..., subfolder="scheduler") on SD 1.5's (PNDM) config.
    noise_scheduler = DDPMScheduler.from_config(
        DDPMScheduler.load_config(os.path.join(CONFIGS, "scheduler"))
    )
    length = text_cfg.max_position_embeddings

    def pad(p):
        return p + [EOS] * (length - len(p))

    row = None
    if case == "dreambooth":
        unet.requires_grad_(True)
        params = list(unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        set_to_none = False  # optimizer.zero_grad(set_to_none=args.set_grads_to_none), default off
        prompts, per_prompt = DREAMBOOTH_PROMPTS, 1
    elif case == "dreambooth-lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet_lora_config = LoraConfig(
            r=4,
            lora_alpha=4,
            lora_dropout=0.0,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"],
        )
        unet.add_adapter(unet_lora_config)
        params = list(filter(lambda p: p.requires_grad, unet.parameters()))
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        set_to_none = True  # optimizer.zero_grad()
        prompts, per_prompt = DREAMBOOTH_PROMPTS, 1
    else:
        from diffusers.models import attention_processor as ap

        unet.requires_grad_(False)
        attention_class = (
            getattr(ap, "CustomDiffusionAttnProcessor2_0", None)
            if hasattr(F, "scaled_dot_product_attention") else None
        ) or ap.CustomDiffusionAttnProcessor
        # As train_custom_diffusion.py installs them, --freeze_model crossattn_kv.
        train_kv = True
        train_q_out = False
        custom_diffusion_attn_procs = {}
        st = unet.state_dict()
        for name, _ in unet.attn_processors.items():
            cross_attention_dim = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
            if name.startswith("mid_block"):
                hidden_size = unet.config.block_out_channels[-1]
            elif name.startswith("up_blocks"):
                block_id = int(name[len("up_blocks.")])
                hidden_size = list(reversed(unet.config.block_out_channels))[block_id]
            elif name.startswith("down_blocks"):
                block_id = int(name[len("down_blocks.")])
                hidden_size = unet.config.block_out_channels[block_id]
            layer_name = name.split(".processor")[0]
            weights = {
                "to_k_custom_diffusion.weight": st[layer_name + ".to_k.weight"],
                "to_v_custom_diffusion.weight": st[layer_name + ".to_v.weight"],
            }
            if cross_attention_dim is not None:
                custom_diffusion_attn_procs[name] = attention_class(
                    train_kv=train_kv,
                    train_q_out=train_q_out,
                    hidden_size=hidden_size,
                    cross_attention_dim=cross_attention_dim,
                ).to(unet.device)
                custom_diffusion_attn_procs[name].load_state_dict(weights)
            else:
                custom_diffusion_attn_procs[name] = attention_class(
                    train_kv=False,
                    train_q_out=False,
                    hidden_size=hidden_size,
                    cross_attention_dim=cross_attention_dim,
                )
        del st
        unet.set_attn_processor(custom_diffusion_attn_procs)
        layers = [p for p in unet.attn_processors.values() if isinstance(p, torch.nn.Module)]
        # <new1>'s row, learned; the rest of the text encoder frozen but run with grad.
        row = (torch.randn(text_cfg.hidden_size) * 0.02).requires_grad_(True)
        params = [row] + [p for m in layers for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-5 * 2 * 2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        set_to_none = False  # optimizer.zero_grad(set_to_none=args.set_grads_to_none), default off
        prompts, per_prompt = CUSTOM_PROMPTS, 2
        te.train()
    unet.train()

    # instance prompts, then class prompts, as the collate_fn concatenates them.
    ids = torch.tensor([pad(p) for p in prompts for _ in range(per_prompt)])
    batch = ids.shape[0]
    h = size // 8
    # Stands in for vae.encode(pixel_values).latent_dist.sample() * scaling_factor.
    latents = torch.randn(batch, unet.config.in_channels, h, h)
    mask = torch.ones(batch, 1, h, h)  # the Custom Diffusion batch's "mask": [B, 1, h, w]
    trainable = {id(p) for p in params}
    every = list(unet.parameters()) + list(te.parameters()) + ([row] if row is not None else [])

    def once():
        handle = None
        if row is not None:
            handle = inject_rows(te, list(range(per_prompt)), [CUSTOM_SLOT] * per_prompt,
                                 [row] * per_prompt)
        try:
            t0 = time.perf_counter()
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,))
            timesteps = timesteps.long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if row is None:
                with torch.no_grad():  # the frozen text encoder: no graph either way
                    encoder_hidden_states = te(ids, return_dict=False)[0]
            else:
                encoder_hidden_states = te(ids)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            target = noise
            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
            if row is None:
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            else:
                m = torch.chunk(mask, 2, dim=0)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                loss = ((loss * m).sum([1, 2, 3]) / m.sum([1, 2, 3])).mean()
            loss = loss + 1.0 * prior_loss
            assert torch.isfinite(loss)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        finally:
            if handle is not None:
                handle.remove()
        # Untimed: exactly the trained weights have gradients.
        got = [p for p in every if p.grad is not None]
        assert len(got) == len(params) and all(id(p) in trainable for p in got), (len(got), len(params))
        assert row is None or row.grad.abs().amax() > 0
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t4 - t3, len(got)

    once()  # warm-up: first-touch of the weights, allocator growth, AdamW's state
    times = [once() for _ in range(runs)]
    totals = [f + b + o for f, b, o, _ in times]
    med = statistics.median(totals)
    i = totals.index(sorted(totals)[(len(totals) - 1) // 2])
    import diffusers

    return {
        "case": case,
        "size": size,
        "runs": runs,
        "median_s": med,
        "forward_s": times[i][0],
        "backward_s": times[i][1],
        "optimizer_s": times[i][2],
        "all_s": totals,
        "peak_gib": vm_hwm_gib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "trained_tensors": times[i][3],
        "trained_params": sum(p.numel() for p in params),
        "unet_batch": batch,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--cases", default="ti,sample")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="1,4,8", help="images per step of the generate case")
    p.add_argument("--out", help="append one JSON line per case to this file")
    p.add_argument("--child", nargs=3, metavar=("CASE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        case, size, batch = a.child[0], int(a.child[1]), int(a.child[2])
        if case == GENERATE:
            print(json.dumps(run_generate(size, batch, a.runs, a.seed)))
        else:
            print(json.dumps(run_case(case, size, a.runs, a.seed)))
        return
    known = [*CASES, *BASELINES, GENERATE]
    for size in (int(s) for s in a.sizes.split(",")):
        for case in a.cases.split(","):
            if case not in known:
                sys.exit(f"unknown case {case!r}: this script times {', '.join(known)}")
            batches = [int(b) for b in a.batches.split(",")] if case == GENERATE else [0]
            for batch in batches:
                load = os.getloadavg()[0]
                cmd = [sys.executable, __file__, "--runs", str(a.runs), "--seed", str(a.seed),
                       "--child", case, str(size), str(batch)]
                res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["load"] = load
                opt = f" / opt {row['optimizer_s']:.2f}" if "optimizer_s" in row else ""
                name = f"{case}/{batch}" if case == GENERATE else case
                print(f"{name:16} {size:4} px  median {row['median_s']:6.2f} s "
                      f"(fwd {row['forward_s']:.2f} / bwd {row['backward_s']:.2f}{opt})  "
                      f"peak {row['peak_gib']:.2f} GiB  load {load:.2f}", flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
