//! Parity of the differentiable text encoder and UNet with transformers/diffusers (golden tensors
//! of tests/fixtures, made by `CLIPTextModel` and `UNet2DConditionModel` on the tiny fixture):
//! forward values and gradients.

mod common;
use attractor::sd::text_encoder::{TextConfig, TextEncoder};
use attractor::sd::unet::{Conditioning, UNet, UNetConfig};
use candle_core::{DType, Tensor, Var};
use common::*;

fn text_encoder() -> TextEncoder {
    let cfg: TextConfig = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-sd/text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    TextEncoder::new(vb("tiny-sd/text_encoder/model.safetensors"), &cfg).unwrap()
}

fn unet() -> UNet {
    let cfg: UNetConfig = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-sd/unet/config.json")).unwrap(),
    )
    .unwrap();
    UNet::new(vb("tiny-sd/unet/diffusion_pytorch_model.safetensors"), &cfg).unwrap()
}

/// transformers `CLIPTextModel(input_ids).last_hidden_state` for the 3 prompts of golden.json.
#[test]
fn text_encoder_matches_transformers() {
    let g = golden();
    let te = text_encoder();
    let out = te.forward(&g["tok.ids"], None).unwrap();
    assert_close("te.out", &out, &g["te.out"], FWD_RTOL, 1e-6);
}

/// Two new token rows spliced in before the position embeddings: forward, and the gradient of
/// `sum(out * R)` with respect to the rows (transformers with a resized embedding table).
#[test]
fn injected_rows_forward_and_gradient() {
    let g = golden();
    let te = text_encoder();
    let rows = Var::from_tensor(&g["te.new_rows"]).unwrap();
    let out = te
        .forward(&g["te.inj_ids"], Some(rows.as_tensor()))
        .unwrap();
    assert_close("te.inj_out", &out, &g["te.inj_out"], FWD_RTOL, 1e-6);
    let loss = (out * &g["te.inj_R"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(rows.as_tensor())
        .expect("gradient to the injected rows is missing");
    assert!(max_abs(grad) > 0.0, "gradient to the injected rows is zero");
    assert_close("te.inj_grad", grad, &g["te.inj_grad"], GRAD_RTOL, 1e-7);
}

/// diffusers `UNet2DConditionModel(sample, t, ctx)` with per-sample timesteps, and the gradient of
/// `mse(out, target)` with respect to the context.
#[test]
fn unet_forward_and_context_gradient() {
    let g = golden();
    let unet = unet();
    let ctx = Var::from_tensor(&g["unet.ctx"]).unwrap();
    let out = unet
        .forward(
            &g["unet.sample"],
            &g["unet.t"],
            &Conditioning::Shared(ctx.as_tensor().clone()),
        )
        .unwrap();
    assert_close("unet.out", &out, &g["unet.out"], FWD_RTOL, 1e-6);
    let loss = (out - &g["unet.target"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(ctx.as_tensor())
        .expect("gradient to the context is missing");
    assert_close("unet.ctx_grad", grad, &g["unet.ctx_grad"], GRAD_RTOL, 1e-9);
}

fn per_layer(k: &Tensor, v: &Tensor) -> Conditioning {
    let n = k.dim(0).unwrap();
    Conditioning::PerLayer(
        (0..n)
            .map(|i| (k.get(i).unwrap(), v.get(i).unwrap()))
            .collect(),
    )
}

/// Cross-attention layer i attends to `unet.pl_ctx[i]` (forward order as in golden.json).
#[test]
fn unet_per_layer_context() {
    let g = golden();
    let unet = unet();
    assert_eq!(unet.config.num_cross_attention_layers(), 16);
    let c = &g["unet.pl_ctx"];
    let out = unet
        .forward(&g["unet.sample"], &g["unet.t"], &per_layer(c, c))
        .unwrap();
    assert_close("unet.pl_out", &out, &g["unet.pl_out"], FWD_RTOL, 1e-6);
}

/// Layer i takes keys from `unet.kv_k[i]` and values from `unet.kv_v[i]` (NeTI's bypass).
#[test]
fn unet_per_layer_keys_and_values() {
    let g = golden();
    let unet = unet();
    let out = unet
        .forward(
            &g["unet.sample"],
            &g["unet.t"],
            &per_layer(&g["unet.kv_k"], &g["unet.kv_v"]),
        )
        .unwrap();
    assert_close("unet.kv_out", &out, &g["unet.kv_out"], FWD_RTOL, 1e-6);
}

/// Text encoder + UNet: the analytic gradient to an injected row against central finite
/// differences (f64 for a clean difference quotient).
#[test]
fn finite_difference_through_text_encoder_and_unet() {
    let g = golden();
    let cast = |vb: candle_nn::VarBuilder<'static>| vb.set_dtype(DType::F64);
    let te_cfg: TextConfig = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-sd/text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    let te = TextEncoder::new(cast(vb("tiny-sd/text_encoder/model.safetensors")), &te_cfg).unwrap();
    let u_cfg: UNetConfig = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-sd/unet/config.json")).unwrap(),
    )
    .unwrap();
    let unet = UNet::new(
        cast(vb("tiny-sd/unet/diffusion_pytorch_model.safetensors")),
        &u_cfg,
    )
    .unwrap();
    let ids = &g["ti.ids"];
    let sample = g["unet.sample"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let target = g["unet.target"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let t = Tensor::new(&[500u32], &dev()).unwrap();
    let loss_of = |rows: &Tensor| -> Tensor {
        let ctx = te.forward(ids, Some(rows)).unwrap();
        let out = unet
            .forward(&sample, &t, &Conditioning::Shared(ctx))
            .unwrap();
        (out - &target).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let rows0 = g["te.new_rows"].to_dtype(DType::F64).unwrap();
    let var = Var::from_tensor(&rows0).unwrap();
    let grads = loss_of(var.as_tensor()).backward().unwrap();
    let grad: Vec<Vec<f64>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
    let base: Vec<Vec<f64>> = rows0.to_vec2().unwrap();
    let h = 1e-4;
    let mut checked = 0;
    for j in [0usize, 5, 17, 31] {
        let eval = |delta: f64| {
            let mut r = base.clone();
            r[0][j] += delta;
            let t = Tensor::new(r, &dev()).unwrap();
            loss_of(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        let an = grad[0][j];
        eprintln!("row 0 col {j}: analytic {an:.6e} finite-diff {fd:.6e}");
        assert!(
            (an - fd).abs() <= 1e-6 + 1e-3 * fd.abs().max(an.abs()),
            "col {j}: {an} vs {fd}"
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
    assert!(grad[0].iter().any(|v| v.abs() > 0.0));
}
