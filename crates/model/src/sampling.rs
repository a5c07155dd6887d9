//! Sampling the next token from logits.
//!
//! Order of processing, as vLLM and the OpenAI API define the parameters:
//! logit bias, then the repetition penalty (prompt and output tokens), the
//! frequency and presence penalties (output tokens), then temperature; with
//! temperature 0 the result is the argmax; otherwise top-k, top-p and min-p
//! filter the distribution and a seeded generator draws from it.
//! Log-probabilities are those of the model's raw distribution (vLLM's
//! default), so they do not depend on the sampling settings.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_store::TokenId;

use crate::grammar::Grammar;

/// What the request asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f32,
    /// Seed for reproducible sampling; random when `None`.
    pub seed: Option<u64>,
    /// Divides positive (multiplies negative) logits of tokens already seen.
    pub repetition_penalty: f32,
    /// Subtracted per occurrence of a token in the output.
    pub frequency_penalty: f32,
    /// Subtracted once for a token present in the output.
    pub presence_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Return the log-probabilities of this many top tokens (0: only the
    /// chosen token's).
    pub top_logprobs: usize,
    /// Constrain the output to this grammar.
    pub grammar: Option<Arc<Grammar>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            top_logprobs: 0,
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The token.
    pub token: TokenId,
    /// Its log-probability under the raw distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(TokenId, f32)>,
}

/// A sequence's sampler: the parameters, the generator, and the token counts
/// the penalties need.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    seen: HashMap<u32, u32>,
    output_counts: HashMap<u32, u32>,
}

fn random_seed() -> u64 {
    // std's per-process random hash keys, without another dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[TokenId]) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed.unwrap_or_else(random_seed));
        let mut seen = HashMap::new();
        if params.repetition_penalty != 1.0 {
            for t in prompt {
                *seen.entry(t.get()).or_insert(0) += 1;
            }
        }
        Self {
            params,
            rng,
            seen,
            output_counts: HashMap::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token and records it as output.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_masked(logits, None)
            .expect("without a mask every token may be sampled")
    }

    /// Picks the next token among those `mask` allows (a bit per token id,
    /// as [`crate::Constraint::mask`] gives), and records it as output;
    /// `None` if the mask leaves no token that can be sampled (a dead
    /// end). Log-probabilities stay the raw distribution's.
    pub fn sample_masked(&mut self, logits: &[f32], mask: Option<&[u32]>) -> Option<Sampled> {
        let p = &self.params;
        let mut l = logits.to_vec();
        if let Some(m) = mask {
            for (i, x) in l.iter_mut().enumerate() {
                if !crate::grammar::allows(m, i) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t.get() as usize) {
                *x += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys().chain(self.output_counts.keys()) {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if mask.is_some() && !l.iter().any(|x| x.is_finite()) {
            return None;
        }
        let (greedy, n_top) = (p.temperature <= 0.0, p.top_logprobs);
        let token = if greedy { argmax(&l) } else { self.draw(&l) };
        let (logprob, top) = logprobs(logits, token, n_top);
        *self.output_counts.entry(token as u32).or_insert(0) += 1;
        Some(Sampled {
            token: TokenId::new(token as u32),
            logprob,
            top,
        })
    }

    /// Temperature, top-k, top-p, min-p, then a draw.
    fn draw(&mut self, l: &[f32]) -> usize {
        // Disjoint borrows: the parameters are read while the generator draws.
        let Self { params: p, rng, .. } = self;
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates by descending probability. Sorting the whole vocabulary
        // costs a millisecond; most requests need only the head.
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        let mut probs: Vec<f32> = l
            .iter()
            .map(|x| ((x - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        for x in &mut probs {
            *x /= total;
        }
        let k = if p.top_k == 0 {
            l.len()
        } else {
            p.top_k.min(l.len())
        };
        let mut head = 64.min(k);
        let keep = loop {
            sort_head(&mut idx, &probs, head);
            let mut cum = 0f32;
            let mut n = 0;
            let floor = p.min_p * probs[idx[0] as usize];
            while n < head {
                let pr = probs[idx[n] as usize];
                if n > 0 && pr < floor {
                    break;
                }
                cum += pr;
                n += 1;
                if cum >= p.top_p {
                    break;
                }
            }
            // Done if a filter stopped inside the sorted head, or k is reached.
            if n < head || head == k || cum >= p.top_p {
                break n;
            }
            head = (head * 4).min(k);
        };
        let kept = &idx[..keep.max(1)];
        let mass: f32 = kept.iter().map(|&i| probs[i as usize]).sum();
        let mut r = rng.random::<f32>() * mass;
        for &i in kept {
            r -= probs[i as usize];
            if r <= 0.0 {
                return i as usize;
            }
        }
        kept[kept.len() - 1] as usize
    }
}

/// Puts the `n` most probable indices first, in descending order (ties by
/// lower id).
fn sort_head(idx: &mut [u32], probs: &[f32], n: usize) {
    let cmp = |a: &u32, b: &u32| {
        probs[*b as usize]
            .total_cmp(&probs[*a as usize])
            .then(a.cmp(b))
    };
    if n < idx.len() {
        idx.select_nth_unstable_by(n, cmp);
    }
    idx[..n].sort_unstable_by(cmp);
}

fn argmax(l: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best
}

/// How likely `token` is under `logits` (raw, before any sampling
/// parameter), with the `n` most likely tokens: scoring given text.
pub fn score(logits: &[f32], token: TokenId, n: usize) -> Sampled {
    let (logprob, top) = logprobs(logits, token.get() as usize, n);
    Sampled {
        token,
        logprob,
        top,
    }
}

/// The raw log-probability of `token` and the `n` best tokens.
fn logprobs(logits: &[f32], token: usize, n: usize) -> (f32, Vec<(TokenId, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    let mut top = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(logits.len());
        sort_head(&mut idx, logits, n);
        top = idx[..n]
            .iter()
            .map(|&i| (TokenId::new(i), logits[i as usize] - lse))
            .collect();
    }
    (logits[token] - lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    #[test]
    fn greedy_is_argmax_and_logprobs_are_raw() {
        let mut s = Sampler::new(
            SamplingParams {
                top_logprobs: 3,
                ..SamplingParams::greedy()
            },
            &[],
        );
        let out = s.sample(&logits());
        assert_eq!(out.token, TokenId::new(1));
        let lse = logits().iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((out.logprob - (3.0 - lse)).abs() < 1e-5);
        let ids: Vec<u32> = out.top.iter().map(|(t, _)| t.get()).collect();
        assert_eq!(ids, [1, 5, 2]);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 1.5,
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
                &[],
            );
            (0..40)
                .map(|_| s.sample(&logits()).token.get())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        let distinct: std::collections::HashSet<_> = run(3).into_iter().collect();
        assert!(
            distinct.len() > 2,
            "temperature 1.5 should spread the draws"
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        for params in [
            SamplingParams {
                top_k: 1,
                seed: Some(1),
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.01,
                seed: Some(1),
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 0.99,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ] {
            let mut s = Sampler::new(params.clone(), &[]);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits()).token, TokenId::new(1), "{params:?}");
            }
        }
    }

    #[test]
    fn top_k_limits_the_support() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 2,
                temperature: 5.0,
                seed: Some(9),
                ..SamplingParams::default()
            },
            &[],
        );
        let seen: std::collections::HashSet<u32> =
            (0..200).map(|_| s.sample(&logits()).token.get()).collect();
        assert_eq!(seen, [1, 5].into_iter().collect());
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_right_set() {
        // 1000 tokens, one dominant: top_p 0.5 keeps only it.
        let mut l = vec![0.0f32; 1000];
        l[777] = 10.0;
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                seed: Some(2),
                ..SamplingParams::default()
            },
            &[],
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&l).token, TokenId::new(777));
        }
        // A flat distribution: top_p 0.9 keeps ~900 tokens, past the first
        // sorted head of 64.
        let flat = vec![0.0f32; 1000];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.9,
                seed: Some(2),
                ..SamplingParams::default()
            },
            &[],
        );
        let seen: std::collections::HashSet<u32> =
            (0..3000).map(|_| s.sample(&flat).token.get()).collect();
        assert!(
            seen.len() > 600 && seen.iter().all(|&t| t < 901),
            "{} tokens, max {:?}",
            seen.len(),
            seen.iter().max()
        );
    }

    #[test]
    fn penalties_and_bias_move_the_argmax() {
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(TokenId::new(3), 10.0)],
                ..SamplingParams::greedy()
            },
            &[],
        );
        assert_eq!(s.sample(&logits()).token, TokenId::new(3));
        // Presence penalty: once token 1 is out, 5 wins.
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 0.5,
                ..SamplingParams::greedy()
            },
            &[],
        );
        assert_eq!(s.sample(&logits()).token, TokenId::new(1));
        assert_eq!(s.sample(&logits()).token, TokenId::new(5));
        // Repetition penalty applies to prompt tokens too.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[TokenId::new(1), TokenId::new(5)],
        );
        assert_eq!(s.sample(&logits()).token, TokenId::new(2));
        // Frequency penalty grows with the count.
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.3,
                ..SamplingParams::greedy()
            },
            &[],
        );
        // 1 (3.0), then 5 (2.9 > 2.7), then 1 (2.7 > 2.6), then 5 (2.6 > 2.5, 2.4).
        let toks: Vec<u32> = (0..4).map(|_| s.sample(&logits()).token.get()).collect();
        assert_eq!(toks, [1, 5, 1, 5]);
    }
}
