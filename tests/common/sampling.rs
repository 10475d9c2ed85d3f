//! Sampling checks: the exact distribution of a generated token, computed by enumerating
//! every sequence before it, and Pearson's chi-square against it.

use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::core::sampling::{distribution, SamplingParams};
use specula::model::{KvCache, Llama};

/// The exact distribution of the `n`-th generated token (1-based): the sum over every
/// sequence of earlier tokens of its probability times the next token's distribution.
pub fn nth_token_distribution(
    model: &Llama<CpuBackend>,
    prompt: &[u32],
    params: &SamplingParams,
    n: usize,
) -> Vec<f64> {
    let b = CpuBackend::new();
    let last_logits = |tokens: &[u32]| {
        let mut kv = KvCache::new(&b, &model.config, 16, 4).unwrap();
        let mut meta = BatchMeta::new(4);
        meta.push_row(tokens, 0, &(0..16).collect::<Vec<_>>(), 1);
        b.to_host(&model.forward(&b, &mut kv, &meta).unwrap()).unwrap()
    };
    let mut out = vec![0f64; model.config.vocab_size];
    let mut stack = vec![(prompt.to_vec(), 1f64)];
    while let Some((context, p)) = stack.pop() {
        let next = distribution(&last_logits(&context), &context, params);
        for (t, &pt) in next.iter().enumerate().filter(|(_, &q)| q > 0.0) {
            if context.len() - prompt.len() + 1 == n {
                out[t] += p * pt as f64;
            } else {
                let mut longer = context.clone();
                longer.push(t as u32);
                stack.push((longer, p * pt as f64));
            }
        }
    }
    out
}

pub fn second_token_distribution(model: &Llama<CpuBackend>, prompt: &[u32], params: &SamplingParams) -> Vec<f64> {
    nth_token_distribution(model, prompt, params, 2)
}

/// Pearson's statistic over bins with an expected count of at least 5 (the rest pooled).
pub fn chi_square(counts: &[usize], expected: &[f64], n: usize) -> (f64, usize) {
    let (mut stat, mut bins, mut pooled_c, mut pooled_e) = (0.0, 0, 0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e >= 5.0 {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        } else {
            pooled_c += c as f64;
            pooled_e += e;
        }
    }
    if pooled_e >= 5.0 {
        stat += (pooled_c - pooled_e).powi(2) / pooled_e;
        bins += 1;
    }
    (stat, bins - 1)
}

/// The chi-square quantile at p = 0.001 (Wilson–Hilferty approximation). Where the runtime
/// batches, which steps draft depends on timing, so a test's draws differ from run to run:
/// at 0.001 a dozen such tests fail by chance about once in a hundred runs, while a real
/// bias of a few percent in one token's probability over 20,000 draws gives a statistic in
/// the hundreds.
pub fn chi_square_critical(dof: usize) -> f64 {
    let k = dof as f64;
    let z = 3.090; // the standard normal's 99.9th percentile
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Asserts that `counts` follow `expected` (chi-square, p = 0.001) and that the drafts behind
/// them were both accepted and rejected (`drafted`, `accepted`).
pub fn assert_follows(label: &str, counts: &[usize], expected: &[f64], (drafted, accepted): (u64, u64)) {
    let (stat, dof) = chi_square(counts, expected, counts.iter().sum());
    eprintln!("{label}: chi2 {stat:.3} on {dof} dof; acceptance {accepted}/{drafted}");
    assert!(accepted > 0 && accepted < drafted, "the test must see both acceptances and rejections");
    assert!(stat < chi_square_critical(dof), "chi-square {stat:.1} exceeds the 0.1% critical value on {dof} dof");
}

/// The third generated token of `prompt`, sampled with `params` and seeds 0..20,000, the
/// engine speculating with `proposer` (chains of up to 3, or trees of `tree`): the counts
/// per token, with the drafts drafted and accepted. The third token is drafted whether the
/// first decoding step drafts or (costs unknown yet) runs plain and the second drafts.
pub fn third_token_counts(
    engine: &specula::engine::Engine<CpuBackend>,
    proposer: &mut dyn specula::spec::Proposer,
    tree: Option<specula::spec::TreeShape>,
    prompt: &[u32],
    params: &SamplingParams,
) -> (Vec<usize>, (u64, u64)) {
    use specula::request::{GenerateRequest, Prompt};
    let (mut counts, mut drafted, mut accepted) = (vec![0usize; engine.model.config.vocab_size], 0, 0);
    for i in 0..20_000u64 {
        let sampling = SamplingParams { seed: Some(i), ..params.clone() };
        let req = GenerateRequest {
            max_tokens: 3,
            ignore_eos: true,
            sampling,
            ..GenerateRequest::new(Prompt::Tokens(prompt.to_vec()))
        };
        let spec =
            specula::engine::SpecOptions { proposer: &mut *proposer, max_draft: 3, synthetic_acceptance: None, tree };
        let out = engine.generate_speculative(&req, Some(spec), |_, _| {}).unwrap();
        counts[out.token_ids[2] as usize] += 1;
        let st = out.speculative.unwrap();
        (drafted, accepted) = (drafted + st.drafted, accepted + st.accepted);
    }
    (counts, (drafted, accepted))
}
