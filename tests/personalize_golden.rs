//! Parity of the personalisation maths with the reference implementations, on the golden tensors
//! of tests/fixtures (README there): NeTI's own `NeTIMapper` / `NeTIPositionalEncoding`
//! (`neti.*`), the InfoNCE of Eq. 5 written in PyTorch (`nce.*`, loss and autograd gradients), and
//! transformers' CLIP tokenizer with diffusers' `tokenizer.add_tokens` (`tok.ids`, `te.inj_ids`,
//! `ti.ids`). Tolerance: `max|ours - ref| <= atol + rtol * max|ref|`.

mod common;
use common::{dev, fixtures, golden, golden_json};

use attractor::personalize::neti::{FourierEncoding, MapperConfig, NetiMapper, UNET_LAYERS};
use attractor::personalize::{info_nce, ClipTokenizer};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::HashMap;

/// Asserts `max|ours - want| <= atol + rtol * max|want|` and returns max|ours - want|.
fn check(name: &str, ours: &Tensor, want: &Tensor, atol: f32, rtol: f32) -> f32 {
    common::assert_close(name, ours, want, rtol, atol)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn golden_mapper(g: &HashMap<String, Tensor>) -> NetiMapper {
    let w = &g["neti.w"];
    let norm = f32s(&g["neti.norm_scale"])[0] as f64;
    let word_dim = g["neti.mapper.output_layer.0.bias"].dim(0).unwrap() / 2;
    let cfg = MapperConfig::new(word_dim, norm);
    let vb = VarBuilder::from_tensors(g.clone(), DType::F32, &dev()).pp("neti.mapper");
    NetiMapper::new(vb, FourierEncoding::from_tensor(w.clone()).unwrap(), &cfg).unwrap()
}

#[test]
fn neti_encoding_and_anchor_init() {
    let g = golden();
    let enc = FourierEncoding::from_tensor(g["neti.w"].clone()).unwrap();
    // The mapper file stores the same frequencies.
    assert_eq!(f32s(&g["neti.w"]), f32s(&g["neti.mapper.encoder.w"]));
    let gamma = enc
        .encode(&f32s(&g["neti.t"]), &f32s(&g["neti.l"]))
        .unwrap();
    check("neti.gamma", &gamma, &g["neti.gamma"], 0.0, 1e-4);
    let anchors = enc.anchors(10, UNET_LAYERS.len()).unwrap();
    check(
        "neti.anchor_weight",
        &anchors,
        &g["neti.anchor_weight"],
        0.0,
        1e-4,
    );
}

#[test]
fn neti_mapper_matches_reference() {
    let g = golden();
    let m = golden_mapper(&g);
    let (t, l) = (f32s(&g["neti.t"]), f32s(&g["neti.l"]));
    let out = m.forward(&t, &l, None, None).unwrap();
    check("neti.out", &out, &g["neti.out"], 0.0, 1e-4);
    let tr = m.forward(&t, &l, Some(16), None).unwrap();
    check("neti.out_trunc16", &tr, &g["neti.out_trunc16"], 0.0, 1e-4);
    // The split: word then bypass.
    let (word, byp) = NetiMapper::split(&out).unwrap();
    check(
        "neti.out[:, :32]",
        &word,
        &g["neti.out"].narrow(1, 0, 32).unwrap(),
        0.0,
        1e-4,
    );
    check(
        "neti.out[:, 32:]",
        &byp,
        &g["neti.out"].narrow(1, 32, 32).unwrap(),
        0.0,
        1e-4,
    );
}

#[test]
fn neti_unet_layer_order_matches_golden_json() {
    let j = golden_json();
    let want: Vec<String> =
        serde_json::from_value(j["unet.cross_attn_layers_in_forward_order"].clone()).unwrap();
    assert_eq!(want, UNET_LAYERS.to_vec());
}

#[test]
fn info_nce_matches_reference_loss_and_gradients() {
    let g = golden();
    let tau = golden_json()["nce.tau"].as_f64().unwrap();
    let v = Var::from_tensor(&g["nce.v"]).unwrap();
    let a = Var::from_tensor(&g["nce.a"]).unwrap();
    let loss = info_nce(v.as_tensor(), a.as_tensor(), tau).unwrap();
    check(
        "nce.loss",
        &loss.reshape(1).unwrap(),
        &g["nce.loss"],
        0.0,
        1e-4,
    );
    let grads = loss.backward().unwrap();
    check(
        "nce.grad_v",
        grads.get(&v).unwrap(),
        &g["nce.grad_v"],
        0.0,
        1e-3,
    );
    check(
        "nce.grad_a",
        grads.get(&a).unwrap(),
        &g["nce.grad_a"],
        0.0,
        1e-3,
    );
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_file(&fixtures().join("tiny-sd/tokenizer/tokenizer.json")).unwrap()
}

fn ids_of(t: &Tensor, row: usize) -> Vec<u32> {
    t.get(row)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

#[test]
fn tokenizer_matches_clip_tokenizer() {
    let g = golden();
    let j = golden_json();
    let tok = tokenizer();
    let prompts: Vec<String> = serde_json::from_value(j["tok.prompts"].clone()).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let e = tok.encode(p).unwrap();
        assert_eq!(e.ids, ids_of(&g["tok.ids"], i), "tok.ids[{i}]: {p}");
        assert!(!e.truncated);
    }
}

#[test]
fn new_tokens_match_diffusers_add_tokens() {
    let g = golden();
    let j = golden_json();
    let mut tok = tokenizer();
    let new = j["te.new_tokens"].as_object().unwrap();
    let mut names: Vec<(&String, u64)> =
        new.iter().map(|(k, v)| (k, v.as_u64().unwrap())).collect();
    names.sort_by_key(|(_, id)| *id);
    let ids = tok
        .add_tokens(&names.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        ids,
        names.iter().map(|(_, id)| *id as u32).collect::<Vec<_>>()
    );
    let e = tok.encode(j["te.inj_prompt"].as_str().unwrap()).unwrap();
    assert_eq!(e.ids, ids_of(&g["te.inj_ids"], 0), "te.inj_ids");
    let e = tok.encode(j["ti"]["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(e.ids, ids_of(&g["ti.ids"], 0), "ti.ids");
    assert_eq!(e.positions(49408), vec![4]);
}
