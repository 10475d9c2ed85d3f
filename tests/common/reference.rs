//! An f64 Llama forward in plain loops, written from the model's definition and nothing in
//! `src/`: full causal attention over the whole sequence, rotate-half RoPE, no KV cache.

use super::tiny::{Llama3Rope, TinyModel, TinySpec};

/// Logits `[tokens.len()][vocab]` for every position of `tokens`.
pub fn forward(model: &TinyModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let weight = |name: &str| -> Vec<f64> { model.get(name).iter().map(|&x| x as f64).collect() };
    forward_with(&model.spec, &weight, &|_, x| x.to_vec(), tokens)
}

/// The forward with weights given by name in f64 (`weight`), and `input(name, x)` being what
/// the projection `name` (a weight's name) computes with in place of its input `x`: `x`
/// itself for a plain model, its quantization for an FP8 one that quantizes activations.
pub fn forward_with(
    s: &TinySpec,
    weight: &dyn Fn(&str) -> Vec<f64>,
    input: &dyn Fn(&str, &[f64]) -> Vec<f64>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let w = weight;
    // `w · input(x)` for the projection named `name`.
    let project = |name: &str, m: &[f64], x: &[f64]| matvec(m, &input(name, x));
    let embed = w("model.embed_tokens.weight");
    let n = tokens.len();
    let mut x: Vec<Vec<f64>> = tokens.iter().map(|&t| embed[t as usize * s.hidden..][..s.hidden].to_vec()).collect();
    let inv_freq = inv_freq(s);
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (s.head_dim as f64).sqrt();

    for l in 0..s.layers {
        let name = |part: &str| format!("model.layers.{l}.{part}.weight");
        let p = |part: &str| w(&name(part));
        let (wq, wk, wv, wo) =
            (p("self_attn.q_proj"), p("self_attn.k_proj"), p("self_attn.v_proj"), p("self_attn.o_proj"));
        let (wg, wu, wd) = (p("mlp.gate_proj"), p("mlp.up_proj"), p("mlp.down_proj"));
        let (norm1, norm2) = (p("input_layernorm"), p("post_attention_layernorm"));

        let h: Vec<Vec<f64>> = x.iter().map(|xi| rms_norm(xi, &norm1, s.eps)).collect();
        let mut q: Vec<Vec<f64>> = h.iter().map(|hi| project(&name("self_attn.q_proj"), &wq, hi)).collect();
        let mut k: Vec<Vec<f64>> = h.iter().map(|hi| project(&name("self_attn.k_proj"), &wk, hi)).collect();
        let v: Vec<Vec<f64>> = h.iter().map(|hi| project(&name("self_attn.v_proj"), &wv, hi)).collect();
        for pos in 0..n {
            rope(&mut q[pos], s.head_dim, pos, &inv_freq);
            rope(&mut k[pos], s.head_dim, pos, &inv_freq);
        }
        for t in 0..n {
            let mut attn = vec![0f64; s.q_dim()];
            for head in 0..s.heads {
                let kvh = head / group;
                let qh = &q[t][head * s.head_dim..][..s.head_dim];
                let scores: Vec<f64> =
                    (0..=t).map(|j| dot(qh, &k[j][kvh * s.head_dim..][..s.head_dim]) * scale).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|&sc| (sc - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    let vj = &v[j][kvh * s.head_dim..][..s.head_dim];
                    for d in 0..s.head_dim {
                        attn[head * s.head_dim + d] += e / sum * vj[d];
                    }
                }
            }
            let o = project(&name("self_attn.o_proj"), &wo, &attn);
            x[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h2 = rms_norm(&x[t], &norm2, s.eps);
            let (g, u) = (project(&name("mlp.gate_proj"), &wg, &h2), project(&name("mlp.up_proj"), &wu, &h2));
            let act: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = project(&name("mlp.down_proj"), &wd, &act);
            x[t].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    let norm = w("model.norm.weight");
    let (head_name, head) =
        if s.tied { ("model.embed_tokens.weight", embed) } else { ("lm_head.weight", w("lm_head.weight")) };
    x.iter().map(|xi| project(head_name, &head, &rms_norm(xi, &norm, s.eps))).collect()
}

/// Inverse frequency of each rotated pair, llama3-scaled when the spec says so.
pub fn inv_freq(s: &TinySpec) -> Vec<f64> {
    (0..s.head_dim / 2)
        .map(|i| {
            let f = s.rope_theta.powf(-((2 * i) as f64) / s.head_dim as f64);
            s.rope_scaling.map_or(f, |r| f / llama3_divisor(f, r))
        })
        .collect()
}

/// How much llama3 scaling divides a frequency by: 1 for short wavelengths, `factor` for long
/// ones, interpolated smoothly between.
pub fn llama3_divisor(freq: f64, r: Llama3Rope) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let ctx = r.original_max_position_embeddings as f64;
    if wavelen < ctx / r.high_freq_factor {
        1.0
    } else if wavelen > ctx / r.low_freq_factor {
        r.factor
    } else {
        let smooth = (ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        1.0 / ((1.0 - smooth) / r.factor + smooth)
    }
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// `w · x` for `w` of shape `[out, x.len()]`.
fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Rotates each head: dimension i pairs with i + head_dim/2 (Hugging Face's rotate_half).
fn rope(x: &mut [f64], head_dim: usize, pos: usize, inv_freq: &[f64]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (pos as f64 * f).sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// `w · x` for f32 weights of shape `[out, x.len()]` (as a checkpoint stores them), in f64.
pub fn matvec_f32(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect()
}

/// `rope` with the inverse frequencies of base `theta` (no scaling).
pub fn rope_theta(x: &mut [f64], head_dim: usize, theta: f64, pos: usize) {
    let inv_freq: Vec<f64> = (0..head_dim / 2).map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64)).collect();
    rope(x, head_dim, pos, &inv_freq);
}
