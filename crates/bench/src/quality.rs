//! Quality parity with llama.cpp: the same model file must compute the
//! same thing. llama.cpp's side is `llama-perplexity --kl-divergence-base
//! FILE`, which tokenizes a text, evaluates it in chunks of `n_ctx` tokens
//! and saves, for the second half of every chunk, each position's whole
//! next-token distribution (as 16-bit log-probabilities). Strata's side is
//! the same chunks, token for token, sent to `/v1/completions` with `echo`
//! and `logprobs: 1`: the log-probability of every prompt token and the
//! top-1 alternative at every position. Compared at every scored position:
//! perplexity, teacher-forced top-1 agreement, and the absolute
//! differences of log-probabilities.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use strata_model::{
    AttnShape, Gguf, KvStore, LlamaModel, LoadOptions, Logits, Row, SeqInput, Tokenizer,
};
use strata_store::TokenId;

use crate::client::{Endpoint, request};

/// The header of a llama-perplexity logits file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogitsHeader {
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Chunks saved.
    pub n_chunk: usize,
    /// The text's tokens, `n_chunk * n_ctx` of them.
    pub tokens: Vec<u32>,
}

/// One scored position of llama.cpp's file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseRow {
    /// The most likely next token.
    pub top1: u32,
    /// Its log-probability.
    pub top1_logprob: f32,
    /// The log-probability of the token that came next in the text.
    pub actual_logprob: f32,
    /// That token was 16 nats or more below the top, where llama.cpp's
    /// file clamps: its log-probability there is only an upper bound.
    pub clamped: bool,
}

/// Reads a logits file: the header, then for each chunk the rows of its
/// scored positions `n_ctx/2 .. n_ctx-1` (each predicting the token after
/// it). The 16-bit values are `scale * q + min_log_prob`, clamped 16 nats
/// below the top, as llama.cpp writes them.
pub fn read_logits(path: &Path) -> Result<(LogitsHeader, Vec<Vec<BaseRow>>)> {
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(path).with_context(|| format!("opening {}", path.display()))?,
    );
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != b"_logits_" {
        bail!("{}: not a llama-perplexity logits file", path.display());
    }
    let i32s = |n: usize, r: &mut BufReader<File>| -> Result<Vec<i32>> {
        let mut b = vec![0u8; n * 4];
        r.read_exact(&mut b)?;
        Ok(b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let h = i32s(3, &mut r)?;
    let dim = |v: i32| usize::try_from(v).ok();
    let (Some(n_ctx), Some(n_vocab), Some(n_chunk)) = (dim(h[0]), dim(h[1]), dim(h[2])) else {
        bail!("{}: negative sizes in the header {h:?}", path.display());
    };
    if n_ctx < 4 || n_vocab == 0 || n_chunk == 0 || n_vocab > 1 << 22 || n_ctx > 1 << 22 {
        bail!(
            "{}: implausible header n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}",
            path.display()
        );
    }
    let (first, nv) = (n_ctx / 2, 2 * n_vocab.div_ceil(2) + 4);
    let expected = n_chunk
        .checked_mul(n_ctx)
        .and_then(|t| t.checked_mul(4))
        .and_then(|t| t.checked_add(20))
        .and_then(|t| {
            n_chunk
                .checked_mul(n_ctx - 1 - first)?
                .checked_mul(nv * 2)?
                .checked_add(t)
        });
    let len = std::fs::metadata(path)?.len();
    if expected.is_none_or(|e| e as u64 != len) {
        bail!(
            "{}: {len} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}) says {expected:?}: the file ends early or is not llama-perplexity's",
            path.display()
        );
    }
    let tokens: Vec<u32> = i32s(n_chunk * n_ctx, &mut r)?
        .into_iter()
        .map(|t| t as u32)
        .collect();
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        bail!(
            "{}: token {t} is outside the vocabulary of {n_vocab}",
            path.display()
        );
    }
    let mut row = vec![0u8; nv * 2];
    let mut chunks = Vec::with_capacity(n_chunk);
    for c in 0..n_chunk {
        let mut rows = Vec::with_capacity(n_ctx - 1 - first);
        for i in 0..n_ctx - 1 - first {
            r.read_exact(&mut row)
                .with_context(|| format!("chunk {c} row {i}: the file ends early"))?;
            let f =
                |at: usize| f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]);
            let (scale, min_lp) = (f(0), f(4));
            let q = |t: usize| u16::from_le_bytes([row[8 + 2 * t], row[9 + 2 * t]]);
            let (mut top, mut top_q) = (0usize, 0u16);
            for t in 0..n_vocab {
                let v = q(t);
                if t == 0 || v > top_q {
                    (top, top_q) = (t, v);
                }
            }
            let next = tokens[c * n_ctx + first + i + 1] as usize;
            rows.push(BaseRow {
                top1: top as u32,
                top1_logprob: scale * top_q as f32 + min_lp,
                actual_logprob: scale * q(next) as f32 + min_lp,
                clamped: q(next) == 0,
            });
        }
        chunks.push(rows);
    }
    Ok((
        LogitsHeader {
            n_ctx,
            n_vocab,
            n_chunk,
            tokens,
        },
        chunks,
    ))
}

/// Strata's view of one position: the prompt token's log-probability and
/// the top-1 alternative's text and log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedRow {
    /// Log-probability of the token that came next.
    pub actual_logprob: f64,
    /// The most likely token's text.
    pub top1_text: String,
    /// Its log-probability.
    pub top1_logprob: f64,
}

/// Parses a `/v1/completions` answer with `echo` and `logprobs`: one row
/// per prompt token after the first.
pub fn served_rows(answer: &Value) -> Result<Vec<ServedRow>> {
    let lp = answer
        .pointer("/choices/0/logprobs")
        .context("the answer has no choices[0].logprobs")?;
    let token_lp = lp["token_logprobs"]
        .as_array()
        .context("no token_logprobs")?;
    let top = lp["top_logprobs"].as_array().context("no top_logprobs")?;
    let mut rows = Vec::new();
    for (i, (t, alts)) in token_lp.iter().zip(top).enumerate().skip(1) {
        let actual = t
            .as_f64()
            .with_context(|| format!("token {i}: no logprob"))?;
        let (text, lp) = alts
            .as_object()
            .and_then(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
            })
            .with_context(|| format!("token {i}: no top_logprobs entry"))?;
        rows.push(ServedRow {
            actual_logprob: actual,
            top1_text: text,
            top1_logprob: lp,
        });
    }
    Ok(rows)
}

/// The comparison's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Parity {
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// Chunks compared.
    pub chunks: usize,
    /// Positions scored (the second half of every chunk).
    pub positions: usize,
    /// Strata's perplexity over them.
    pub ppl_strata: f64,
    /// llama.cpp's over them, from its file's 16-bit log-probabilities.
    pub ppl_llama_file: f64,
    /// llama.cpp's own printed estimate, when given.
    pub ppl_llama_reported: Option<f64>,
    /// Strata's over llama.cpp's, minus 1.
    pub ppl_relative_diff: f64,
    /// Positions where both put the same token first, as a fraction.
    pub top1_agreement: f64,
    /// Mean |difference| of the top-1 log-probability where the two agree.
    pub mean_abs_top1_logprob_diff: f64,
    /// Mean |difference| of the text's next token's log-probability.
    pub mean_abs_token_logprob_diff: f64,
    /// The largest such difference.
    pub max_abs_token_logprob_diff: f64,
    /// Positions left out of the log-probability differences: llama.cpp's
    /// file clamps the next token there (16 nats below the top).
    pub clamped_positions: usize,
    /// Positions left out of the top-1 comparison: Strata's top token is a
    /// partial UTF-8 byte (its text, all the API gives, is U+FFFD, which
    /// several tokens share).
    pub ambiguous_top1: usize,
    /// Against the f32 reference ([`reference_rows`]), over its first
    /// chunks: how near each side is to the model's exact numbers.
    pub reference: Option<ReferenceParity>,
}

/// Both sides against the f32 reference.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReferenceParity {
    /// Positions compared (the scored half of the first chunks).
    pub positions: usize,
    /// Those of them in the top-1 comparison (not ambiguous).
    pub top1_compared: usize,
    /// Those in the log-probability differences (not clamped).
    pub compared: usize,
    /// The reference's perplexity over them.
    pub ppl_reference: f64,
    /// Strata's and llama.cpp's perplexity over the same positions.
    pub ppl_strata: f64,
    /// llama.cpp's, from its file.
    pub ppl_llama: f64,
    /// Top-1 agreement of Strata with the reference.
    pub strata_top1: f64,
    /// Of llama.cpp with the reference.
    pub llama_top1: f64,
    /// Mean |difference| of the next token's log-probability, Strata vs
    /// the reference.
    pub strata_mean_abs: f64,
    /// llama.cpp vs the reference.
    pub llama_mean_abs: f64,
}

/// K and V kept in f32 (no f16 rounding), attention accumulated in f64:
/// the KV side of the reference.
struct ExactKv {
    shape: AttnShape,
    /// `[layer]` -> positions x (kv_heads * head_dim).
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvStore for ExactKv {
    fn store(&mut self, layer: usize, row: Row, k: &[f32], v: &[f32]) {
        let w = k.len();
        for (store, x) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            if store.len() < (row.pos + 1) * w {
                store.resize((row.pos + 1) * w, 0.0);
            }
            store[row.pos * w..(row.pos + 1) * w].copy_from_slice(x);
        }
    }

    fn attend(&self, layer: usize, rows: &[Row], q: &[f32], out: &mut [f32]) {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: hd,
        } = self.shape;
        let kw = kv_heads * hd;
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for (r, row) in rows.iter().enumerate() {
            for h in 0..heads {
                let g = h / group;
                let qh = &q[(r * heads + h) * hd..(r * heads + h + 1) * hd];
                let scores: Vec<f64> = (0..=row.pos)
                    .map(|p| {
                        let k = &self.k[layer][p * kw + g * hd..p * kw + (g + 1) * hd];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                let o = &mut out[(r * heads + h) * hd..(r * heads + h + 1) * hd];
                for (d, od) in o.iter_mut().enumerate() {
                    let acc: f64 = w
                        .iter()
                        .enumerate()
                        .map(|(p, wp)| wp * f64::from(self.v[layer][p * kw + g * hd + d]))
                        .sum();
                    *od = (acc / sum) as f32;
                }
            }
        }
    }
}

/// One position of the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefRow {
    /// The most likely next token.
    pub top1: u32,
    /// The log-probability of the token that came next.
    pub actual_logprob: f64,
}

/// The reference's rows for one chunk's scored positions `first..n-1`
/// (row i predicts token `first + i + 1`): the model evaluated with
/// activations in f32, matmuls and attention accumulated in f64, K and V
/// unrounded ([`LlamaModel::forward_reference`]).
pub fn reference_rows(model: &LlamaModel, tokens: &[u32], first: usize) -> Result<Vec<RefRow>> {
    let c = model.config();
    let shape = AttnShape {
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
    };
    let mut kv = ExactKv {
        shape,
        k: vec![Vec::new(); c.layers],
        v: vec![Vec::new(); c.layers],
    };
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
        bail!("token {t} is outside the model's vocabulary of {}", c.vocab);
    }
    let ids: Vec<TokenId> = tokens.iter().map(|&t| TokenId::new(t)).collect();
    let logits = model.forward_reference(
        &[SeqInput {
            tokens: &ids,
            start: 0,
            block_table: &[],
            logits: Logits::All,
        }],
        &mut kv,
    )?;
    let all = logits.into_iter().next().context("no logits")?;
    let v = c.vocab;
    Ok((first..tokens.len() - 1)
        .map(|p| {
            let row = &all[p * v..(p + 1) * v];
            let (mut top, mut max) = (0usize, f32::NEG_INFINITY);
            for (i, &x) in row.iter().enumerate() {
                if x > max {
                    (top, max) = (i, x);
                }
            }
            let lse = f64::from(max)
                + row
                    .iter()
                    .map(|&x| (f64::from(x) - f64::from(max)).exp())
                    .sum::<f64>()
                    .ln();
            RefRow {
                top1: top as u32,
                actual_logprob: f64::from(row[tokens[p + 1] as usize]) - lse,
            }
        })
        .collect())
}

/// Scores the file's chunks on Strata at `ep` and compares them with the
/// file's rows. `model` gives the tokenizer (token text, BOS), the same
/// GGUF both servers run.
pub async fn compare(
    ep: &Endpoint,
    logits: &Path,
    model: &Path,
    ppl_reported: Option<f64>,
    max_chunks: Option<usize>,
    reference_chunks: usize,
    say: &mut dyn FnMut(&str),
) -> Result<Parity> {
    say("reading llama.cpp's logits file");
    let (h, base) = read_logits(logits)?;
    let gguf = Gguf::open(model).with_context(|| format!("opening {}", model.display()))?;
    let tok = Tokenizer::from_gguf(gguf.content())?;
    if tok.vocab_size() != h.n_vocab {
        bail!(
            "the logits file has a vocabulary of {} but {} has {}: not the same model",
            h.n_vocab,
            model.display(),
            tok.vocab_size()
        );
    }
    let first = h.n_ctx / 2;
    let chunks = max_chunks.unwrap_or(h.n_chunk).min(h.n_chunk);
    let mut p = Parity {
        n_ctx: h.n_ctx,
        chunks,
        ..Parity::default()
    };
    p.ppl_llama_reported = ppl_reported;
    let (mut nll_s, mut nll_l, mut agree, mut top_diff, mut tok_diff) =
        (0f64, 0f64, 0usize, 0f64, 0f64);
    let reference_model = if reference_chunks > 0 {
        say("loading the model for the f32 reference");
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        Some(LlamaModel::open(
            model,
            LoadOptions {
                threads,
                requantize: false,
            },
        )?)
    } else {
        None
    };
    let mut rp = ReferenceParity::default();
    let (mut r_nll, mut r_nll_s, mut r_nll_l, mut r_top_s, mut r_top_l, mut r_abs_s, mut r_abs_l) =
        (0f64, 0f64, 0f64, 0usize, 0usize, 0f64, 0f64);
    for (c, rows) in base.iter().enumerate().take(chunks) {
        say(&format!("chunk {}/{chunks}", c + 1));
        let mut ids: Vec<u32> = h.tokens[c * h.n_ctx..(c + 1) * h.n_ctx].to_vec();
        if tok.add_bos()
            && let Some(b) = tok.bos()
        {
            ids[0] = b.get();
        }
        let body =
            json!({"prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0});
        let (status, text) = request(
            ep,
            "POST",
            &format!("{}/completions", ep.prefix),
            Some(&body),
            Duration::from_secs(600),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        if status != 200 {
            bail!("chunk {c}: HTTP {status}: {text:.300}");
        }
        let served = served_rows(&serde_json::from_str(&text)?)?;
        if served.len() != h.n_ctx - 1 {
            bail!("chunk {c}: {} rows for {} tokens", served.len(), h.n_ctx);
        }
        if let Some(m) = reference_model.as_ref().filter(|_| c < reference_chunks) {
            say(&format!("chunk {}: the f32 reference (slow)", c + 1));
            let refs = reference_rows(m, &ids, first)?;
            for (i, (b, r)) in rows.iter().zip(&refs).enumerate() {
                let s = &served[first + i];
                r_nll -= r.actual_logprob;
                r_nll_s -= s.actual_logprob;
                r_nll_l -= f64::from(b.actual_logprob);
                if !b.clamped {
                    r_abs_s += (s.actual_logprob - r.actual_logprob).abs();
                    r_abs_l += (f64::from(b.actual_logprob) - r.actual_logprob).abs();
                    rp.compared += 1;
                }
                if !s.top1_text.contains('\u{FFFD}') {
                    let ref_text =
                        String::from_utf8_lossy(tok.token_bytes(TokenId::new(r.top1))).into_owned();
                    r_top_s += usize::from(ref_text == s.top1_text);
                    r_top_l += usize::from(b.top1 == r.top1);
                    rp.top1_compared += 1;
                }
                rp.positions += 1;
            }
        }
        for (i, b) in rows.iter().enumerate() {
            // Row i of the file predicts token first + i + 1; served row k
            // is token k + 1's.
            let s = &served[first + i];
            nll_s -= s.actual_logprob;
            nll_l -= f64::from(b.actual_logprob);
            if b.clamped {
                p.clamped_positions += 1;
            } else {
                let d = (s.actual_logprob - f64::from(b.actual_logprob)).abs();
                tok_diff += d;
                p.max_abs_token_logprob_diff = p.max_abs_token_logprob_diff.max(d);
            }
            if s.top1_text.contains('\u{FFFD}') {
                p.ambiguous_top1 += 1;
            } else if String::from_utf8_lossy(tok.token_bytes(TokenId::new(b.top1))) == s.top1_text
            {
                agree += 1;
                top_diff += (s.top1_logprob - f64::from(b.top1_logprob)).abs();
            }
            p.positions += 1;
        }
    }
    let n = p.positions.max(1) as f64;
    p.ppl_strata = (nll_s / n).exp();
    p.ppl_llama_file = (nll_l / n).exp();
    // llama-perplexity's printed figure covers every chunk: over fewer,
    // compare with the file's figure over the same positions.
    let llama_ppl = ppl_reported
        .filter(|_| chunks == h.n_chunk)
        .unwrap_or(p.ppl_llama_file);
    p.ppl_relative_diff = p.ppl_strata / llama_ppl - 1.0;
    // The file read back must give llama.cpp's own figure (to within its
    // clamping): else this reader has misread its format.
    if let Some(r) = ppl_reported.filter(|_| chunks == h.n_chunk)
        && (p.ppl_llama_file / r - 1.0).abs() > 0.01
    {
        bail!(
            "llama.cpp's file gives perplexity {:.4} but llama-perplexity printed {r:.4}: the logits file was misread",
            p.ppl_llama_file
        );
    }
    p.top1_agreement = agree as f64 / (p.positions - p.ambiguous_top1).max(1) as f64;
    p.mean_abs_top1_logprob_diff = top_diff / agree.max(1) as f64;
    p.mean_abs_token_logprob_diff = tok_diff / (p.positions - p.clamped_positions).max(1) as f64;
    if rp.positions > 0 {
        let m = rp.positions as f64;
        rp.ppl_reference = (r_nll / m).exp();
        rp.ppl_strata = (r_nll_s / m).exp();
        rp.ppl_llama = (r_nll_l / m).exp();
        let t = rp.top1_compared.max(1) as f64;
        let c = rp.compared.max(1) as f64;
        rp.strata_top1 = r_top_s as f64 / t;
        rp.llama_top1 = r_top_l as f64 / t;
        rp.strata_mean_abs = r_abs_s / c;
        rp.llama_mean_abs = r_abs_l / c;
        p.reference = Some(rp);
    }
    Ok(p)
}
