//! Parity of one personalisation training step with the PyTorch reference (golden tensors of
//! tests/fixtures, README there): NeTI's textual bypass on the tiny text encoder (`neti.k_ctx`,
//! `neti.v_ctx`), one Textual Inversion step (`ti.*`: loss, gradient to the new rows, AdamW
//! update) and the masked subject/background losses of the same step (`masked.*`).
//! Tolerances: forward `rtol = 1e-4`, gradients `rtol = 1e-3`.

mod common;
use attractor::data::image::mask_to_latent;
use attractor::hub::{resolve_sd, ModelSource};
use attractor::personalize::concept::bypass_contexts;
use attractor::personalize::optim::{AdamW, AdamWConfig};
use attractor::personalize::{bypass, masked_mse, mse};
use attractor::pipeline::StableDiffusion;
use attractor::sd::unet::Conditioning;
use candle_core::{DType, Tensor, Var};
use common::*;
use std::collections::HashMap;

const ATOL: f32 = 1e-6;
const GRAD_ATOL: f32 = 1e-9;

fn open_tiny_sd() -> StableDiffusion {
    let files = resolve_sd(&ModelSource::Local(fixtures().join("tiny-sd")), true)
        .expect("tests/fixtures/tiny-sd resolves as a local diffusers folder");
    StableDiffusion::open(&files, &dev(), DType::F32).expect("tiny-sd opens")
}

/// `<v*>` added to the tokenizer (id 49408 as in golden.json) and the prompt tokenized.
fn placeholder_ids(sd: &mut StableDiffusion, prompt: &str) -> Tensor {
    let j = golden_json();
    let ids = sd.tokenizer.add_tokens(&["<v*>"]).unwrap();
    assert_eq!(
        ids[0] as u64,
        j["te.new_tokens"]["<v*>"].as_u64().unwrap(),
        "<v*> id"
    );
    sd.tokenize(prompt).unwrap()
}

/// NeTI's bypass: keys = final_ln(E), values = final_ln(E + alpha * b/|b| * |e| at `<v*>`), with
/// word vector `neti.out[0][:32]` and bypass `neti.out[0][32:]`, through both of our code paths
/// (the trainer's `concept::bypass_contexts` and the stand-alone `neti::bypass`).
#[test]
fn neti_bypass_contexts_match_reference() {
    let g = golden();
    let j = golden_json();
    let mut sd = open_tiny_sd();
    let ids = placeholder_ids(&mut sd, j["neti"]["bypass_prompt"].as_str().unwrap());
    let alpha = j["neti"]["alpha"].as_f64().unwrap();
    let d = sd.text.config.hidden_size;
    let out0 = g["neti.out"].get(0).unwrap();
    let word = out0.narrow(0, 0, d).unwrap().reshape((1, d)).unwrap();
    let byp = out0.narrow(0, d, d).unwrap().reshape((1, d)).unwrap();

    // 1. concept::bypass_contexts with per-row word vectors [R, n_new, D].
    let extra = word.unsqueeze(0).unwrap();
    let (k, v) =
        bypass_contexts(&sd.text, &ids, &extra, std::slice::from_ref(&byp), alpha).unwrap();
    assert_close(
        "neti.k_ctx (bypass_contexts)",
        &k,
        &g["neti.k_ctx"],
        FWD_RTOL,
        ATOL,
    );
    assert_close(
        "neti.v_ctx (bypass_contexts)",
        &v,
        &g["neti.v_ctx"],
        FWD_RTOL,
        ATOL,
    );

    // 2. neti::bypass on the pre-layer-norm states.
    let e = sd
        .text
        .encode_embeddings_pre_ln(&sd.text.embed_tokens(&ids, Some(&word)).unwrap())
        .unwrap();
    let k2 = sd.text.final_layer_norm(&e).unwrap();
    let pos: Vec<u32> = ids
        .get(0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let p = pos.iter().position(|&i| i == 49408).unwrap();
    let v2 = sd
        .text
        .final_layer_norm(&bypass(&e, &[p], &byp, alpha).unwrap())
        .unwrap();
    assert_close(
        "neti.k_ctx (neti::bypass)",
        &k2,
        &g["neti.k_ctx"],
        FWD_RTOL,
        ATOL,
    );
    assert_close(
        "neti.v_ctx (neti::bypass)",
        &v2,
        &g["neti.v_ctx"],
        FWD_RTOL,
        ATOL,
    );
    // The bypass reaches the values only, and changes them.
    assert!(
        max_abs(&(&v2 - &k2).unwrap()) > 1e-3,
        "the bypass changed nothing"
    );
}

/// NeTI encodes each prompt once per UNet layer; the copies share the tokens before their first
/// new token, which `bypass_contexts` runs once per prompt
/// (`TextEncoder::encode_shared_prefix_pre_ln`). Two prompts x three copies, layer-major as the
/// trainer lays them out, each copy with its own word vector: keys, values and the gradients to
/// the word vectors must be those of the plain pass over every row.
#[test]
fn neti_prompt_copies_share_their_prefix() {
    let mut sd = open_tiny_sd();
    let a = placeholder_ids(&mut sd, "a photo of a <v*>");
    let b = sd
        .tokenize("a dark photo of the cool <v*> on the beach")
        .unwrap();
    let (copies, d) = (3, sd.text.config.hidden_size);
    let ids = Tensor::cat(&[&a, &b], 0)
        .unwrap()
        .repeat((copies, 1))
        .unwrap();
    let rows = ids.dim(0).unwrap();
    let words = Var::from_tensor(&Tensor::randn(0f32, 0.5, (rows, 1, d), &dev()).unwrap()).unwrap();
    let byp = Tensor::randn(0f32, 1.0, (rows, d), &dev()).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (rows, 77, d), &dev()).unwrap();
    let loss = |k: &Tensor, v: &Tensor| {
        ((k * &probe).unwrap().sum_all().unwrap() + (v * &probe).unwrap().sum_all().unwrap())
            .unwrap()
    };

    let (k, v) = bypass_contexts(
        &sd.text,
        &ids,
        words.as_tensor(),
        std::slice::from_ref(&byp),
        0.2,
    )
    .unwrap();
    let g = loss(&k, &v).backward().unwrap();
    let g = g.get(words.as_tensor()).unwrap().clone();

    // The plain pass: every row through the whole encoder, the bypass at each row's <v*>.
    let e = sd
        .text
        .encode_embeddings_pre_ln(&sd.text.embed_tokens(&ids, Some(words.as_tensor())).unwrap())
        .unwrap();
    let vocab = sd.text.config.vocab_size as u32;
    let pos: Vec<usize> = ids
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().position(|&i| i >= vocab).unwrap())
        .collect();
    assert!(
        pos.iter().all(|&p| p >= 5),
        "the prompts have a prefix to share"
    );
    let k_ref = sd.text.final_layer_norm(&e).unwrap();
    let v_ref = sd
        .text
        .final_layer_norm(&bypass(&e, &pos, &byp, 0.2).unwrap())
        .unwrap();
    let g_ref = loss(&k_ref, &v_ref).backward().unwrap();
    let g_ref = g_ref.get(words.as_tensor()).unwrap();

    assert_close("keys", &k, &k_ref, 1e-4, 1e-5);
    assert_close("values", &v, &v_ref, 1e-4, 1e-5);
    assert_close("gradient to the word vectors", &g, g_ref, 1e-4, 1e-5);
    assert!(max_abs(g_ref) > 0.0);
}

/// The UNet's noise prediction for the TI step with the two new rows `rows` spliced in.
fn ti_prediction(sd: &StableDiffusion, g: &HashMap<String, Tensor>, rows: &Tensor) -> Tensor {
    let scale = golden_json()["vae.scaling_factor"].as_f64().unwrap();
    let latents = (&g["vae.mean"] * scale).unwrap();
    let t: Vec<i64> = g["ti.t"].to_vec1().unwrap();
    let noisy = sd
        .schedule
        .add_noise(&latents, &g["ti.noise"], &[t[0] as usize])
        .unwrap();
    let ctx = sd.text.forward(&g["ti.ids"], Some(rows)).unwrap();
    sd.unet
        .forward(&noisy, &g["ti.t"], &Conditioning::Shared(ctx))
        .unwrap()
}

fn adamw_from_golden() -> (AdamWConfig, f64) {
    let a = &golden_json()["ti"]["adamw"];
    let cfg = AdamWConfig {
        beta1: a["betas"][0].as_f64().unwrap(),
        beta2: a["betas"][1].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
    };
    (cfg, a["lr"].as_f64().unwrap())
}

/// One Textual Inversion step: MSE loss, gradient to both new rows, one AdamW step.
#[test]
fn textual_inversion_step_matches_reference() {
    let g = golden();
    let mut sd = open_tiny_sd();
    // ti.ids is what our tokenizer gives for the TI prompt with <v*> added.
    let ids = placeholder_ids(&mut sd, golden_json()["ti"]["prompt"].as_str().unwrap());
    assert_eq!(
        ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
        g["ti.ids"].to_vec2::<i64>().unwrap()
    );
    let rows = Var::from_tensor(&g["te.new_rows"]).unwrap();
    let pred = ti_prediction(&sd, &g, rows.as_tensor());
    let loss = mse(&pred, &g["ti.noise"]).unwrap();
    assert_close(
        "ti.loss",
        &loss.reshape(1).unwrap(),
        &g["ti.loss"],
        FWD_RTOL,
        ATOL,
    );
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(rows.as_tensor())
        .expect("no gradient to the rows");
    assert!(max_abs(&grad.get(0).unwrap()) > 0.0, "<v*> got no gradient");
    assert_close("ti.grad", grad, &g["ti.grad"], GRAD_RTOL, GRAD_ATOL);

    let (cfg, lr) = adamw_from_golden();
    let mut opt = AdamW::new(vec![rows.clone()], cfg).unwrap();
    opt.step(&grads, lr).unwrap();
    assert_eq!(opt.t, 1);
    assert_close(
        "ti.rows_after",
        rows.as_tensor(),
        &g["ti.rows_after"],
        FWD_RTOL,
        ATOL,
    );
    // The update moved <v*> by about lr per coordinate (Adam's first step is lr * sign(g)).
    let moved = max_abs(&(rows.as_tensor() - &g["te.new_rows"]).unwrap());
    assert!(moved > 0.5 * lr as f32, "AdamW moved the rows by {moved}");
    // <a0*> is not in the prompt: zero gradient, so only the decoupled weight decay moves it, by
    // at most lr * wd * |row| (~2e-6), below the README tolerance above: check it tightly.
    let decayed = (g["te.new_rows"].get(1).unwrap() * (1.0 - lr * cfg.weight_decay)).unwrap();
    assert_close(
        "ti.rows_after[1] (weight decay only)",
        &rows.as_tensor().get(1).unwrap(),
        &decayed,
        0.0,
        1e-8,
    );
    assert_close(
        "ti.rows_after[1] vs reference",
        &rows.as_tensor().get(1).unwrap(),
        &g["ti.rows_after"].get(1).unwrap(),
        0.0,
        1e-8,
    );
}

/// The masked losses of the same step and the gradient of `sub + 0.5 * bg`.
#[test]
fn masked_losses_match_reference() {
    let g = golden();
    let sd = open_tiny_sd();
    let m = mask_to_latent(&g["mask.image"], 16).unwrap();
    assert_close("mask.latent", &m, &g["mask.latent"], 0.0, 0.0);
    let m = g["mask.latent"].clone();
    let bg_mask = (1.0 - &m).unwrap();

    let rows = Var::from_tensor(&g["te.new_rows"]).unwrap();
    let pred = ti_prediction(&sd, &g, rows.as_tensor());
    let sub = masked_mse(&pred, &g["ti.noise"], &m).unwrap();
    let bg = masked_mse(&pred, &g["ti.noise"], &bg_mask).unwrap();
    assert_close(
        "masked.sub_loss",
        &sub.reshape(1).unwrap(),
        &g["masked.sub_loss"],
        FWD_RTOL,
        ATOL,
    );
    assert_close(
        "masked.bg_loss",
        &bg.reshape(1).unwrap(),
        &g["masked.bg_loss"],
        FWD_RTOL,
        ATOL,
    );
    // The two masks partition the grid, so the parts add up to the plain loss.
    let plain = mse(&pred, &g["ti.noise"]).unwrap();
    let sum = (&sub + &bg).unwrap();
    assert_close(
        "sub + bg = mse",
        &sum.reshape(1).unwrap(),
        &plain.reshape(1).unwrap(),
        FWD_RTOL,
        ATOL,
    );
    let total = (sub + (bg * 0.5).unwrap()).unwrap();
    let grads = total.backward().unwrap();
    let grad = grads
        .get(rows.as_tensor())
        .expect("no gradient to the rows");
    assert_close(
        "masked.grad_sub_plus_half_bg",
        grad,
        &g["masked.grad_sub_plus_half_bg"],
        GRAD_RTOL,
        GRAD_ATOL,
    );
}
