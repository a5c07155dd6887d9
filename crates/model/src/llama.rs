//! The llama forward pass over a mixed batch of sequences.
//!
//! ```text
//!   tokens of every sequence, flattened to rows
//!   x = embed(tokens)
//!   per layer:  h = rmsnorm(x); [q|k|v] = h Wqkv; rope(q, k) at each row's position
//!               store k, v; a = attention(q); x += a Wo
//!               h = rmsnorm(x); [g|u] = h Wgu; x += (silu(g) * u) Wdown
//!   logits only for the last row of each sequence that asks for them
//! ```
//!
//! Every step of it computes each row on its own (candle's quantized matmul
//! quantizes and dots each activation row separately; norms, RoPE and
//! attention are per row), so a row's logits do not depend on the rest of
//! the batch.

use std::path::Path;

use strata_store::{Arena, ArenaLayout, BlockId, TokenId};

use crate::attention::{AttnShape, KvStore, PagedKv, Row};
use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::weights::{Gguf, Linear, Weights, sha256_file};

/// Version of the KV format (dtype, layout, RoPE application). Bump it when
/// any of these change, so persisted KV of the old format is never reused.
pub const KV_FORMAT_VERSION: u32 = 1;

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// The new tokens this step computes.
    pub tokens: &'a [TokenId],
    /// Absolute position of `tokens[0]`.
    pub start: usize,
    /// The sequence's blocks, covering positions `0 .. start + tokens.len()`.
    pub block_table: &'a [BlockId],
    /// Which rows' logits to return.
    pub logits: Logits,
}

/// Which rows of a sequence's part of a step return logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that samples nothing).
    None,
    /// The last row's (the row that samples).
    Last,
    /// Every row's, row after row (scoring a prompt: each row's logits
    /// give the log-probability of the next token).
    All,
}

/// How to load a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Threads for attention (match the matmul threads, see
    /// [`crate::set_compute_threads`]).
    pub threads: usize,
    /// Requantize Q4_1 weights to Q8_0 for candle's kernel instead of
    /// running them on our own Q4_1 kernel (off by default: ours reads 40%
    /// fewer bytes and keeps the file's exact weights). Q5_0 and Q5_1 are
    /// always requantized: candle's kernels for them are scalar.
    pub requantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            requantize: false,
        }
    }
}

/// A loaded llama-family model.
pub struct LlamaModel {
    config: LlamaConfig,
    weights: Weights,
    file_sha256: [u8; 32],
    inv_freq: Vec<f32>,
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * g;
    }
}

/// Runs `parts` (one fused matrix, or several) and lays their outputs side by
/// side per row.
fn project(
    parts: &[Linear],
    x: &[f32],
    rows: usize,
    pool: &rayon::ThreadPool,
    exact: bool,
) -> Result<Vec<f32>, ModelError> {
    if let [one] = parts {
        return linear(one, x, rows, pool, exact);
    }
    let width: usize = parts.iter().map(|p| p.out).sum();
    let mut out = vec![0f32; rows * width];
    let mut col = 0;
    for p in parts {
        let y = linear(p, x, rows, pool, exact)?;
        for r in 0..rows {
            out[r * width + col..r * width + col + p.out]
                .copy_from_slice(&y[r * p.out..(r + 1) * p.out]);
        }
        col += p.out;
    }
    Ok(out)
}

/// One linear layer: our kernels, or the exact reference product.
fn linear(
    l: &Linear,
    x: &[f32],
    rows: usize,
    pool: &rayon::ThreadPool,
    exact: bool,
) -> Result<Vec<f32>, ModelError> {
    if exact {
        l.forward_exact(x, rows, pool)
    } else {
        l.forward(x, rows, pool)
    }
}

impl LlamaModel {
    /// Loads the weights of an opened GGUF file.
    pub fn load(g: &mut Gguf, options: LoadOptions) -> Result<Self, ModelError> {
        let threads = options.threads;
        let config = LlamaConfig::from_gguf(g.content())?;
        let weights = Weights::load(g, &config, options.requantize)?;
        let file_sha256 = sha256_file(g.path())?;
        let half = config.rope_dims / 2;
        let inv_freq = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f32 / config.rope_dims as f32)
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("strata-attn-{i}"))
            .build()
            .map_err(|e| ModelError::Compute(e.to_string()))?;
        Ok(Self {
            config,
            weights,
            file_sha256,
            inv_freq,
            pool,
        })
    }

    /// Opens and loads a GGUF file.
    pub fn open(path: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        Self::load(&mut Gguf::open(path)?, options)
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// SHA-256 of the weights file.
    pub fn file_sha256(&self) -> [u8; 32] {
        self.file_sha256
    }

    /// Tensors requantized at load (`name:from->to`).
    pub fn requantized(&self) -> &[String] {
        &self.weights.requantized
    }

    /// Bytes of weights read by one forward pass (all layers and the output).
    pub fn weight_bytes(&self) -> usize {
        let w = &self.weights;
        w.output.weight_bytes()
            + w.layers
                .iter()
                .map(|l| {
                    l.qkv
                        .iter()
                        .chain(&l.gate_up)
                        .map(Linear::weight_bytes)
                        .sum::<usize>()
                        + l.wo.weight_bytes()
                        + l.down.weight_bytes()
                })
                .sum::<usize>()
    }

    /// Multiply-accumulates of the layers' matmuls per token (every
    /// layer's projections; attention's are not counted, they grow with
    /// the context, and neither is the output head, which runs only for
    /// the rows that sample: [`Self::output_macs`]).
    pub fn matmul_macs_per_token(&self) -> usize {
        let macs = |l: &Linear| l.out * l.input;
        self.weights
            .layers
            .iter()
            .map(|l| {
                l.qkv.iter().chain(&l.gate_up).map(macs).sum::<usize>()
                    + macs(&l.wo)
                    + macs(&l.down)
            })
            .sum()
    }

    /// Multiply-accumulates of the output head for one row.
    pub fn output_macs(&self) -> usize {
        self.weights.output.out * self.weights.output.input
    }

    /// The arena layout for `num_blocks` blocks of `block_size` tokens.
    pub fn arena_layout(&self, num_blocks: usize, block_size: usize) -> ArenaLayout {
        ArenaLayout {
            num_blocks,
            layers: self.config.layers,
            kv_heads: self.config.kv_heads,
            block_size,
            head_dim: self.config.head_dim,
        }
    }

    /// Everything that changes the KV bytes, for the KV core's extra keys:
    /// the weights file's content hash, load-time requantization, RoPE
    /// settings, KV dtype, block size and layout, and the format version.
    pub fn fingerprint(&self, block_size: usize) -> Vec<u8> {
        let c = &self.config;
        let s = format!(
            "strata-kv-format={KV_FORMAT_VERSION};weights-sha256={};requantized={};\
             rope=theta:{},dims:{},pairing:{:?};kv-dtype=f16;block-size={block_size};\
             layout=[block][layer][K|V][kv_head][slot][head_dim];layers={};kv-heads={};head-dim={}",
            hex(&self.file_sha256),
            self.weights.requantized.join(","),
            c.rope_theta,
            c.rope_dims,
            c.rope_pairing,
            c.layers,
            c.kv_heads,
            c.head_dim,
        );
        s.into_bytes()
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step over the paged arena. Returns the logits of each
    /// sequence that asked for them, in batch order: `vocab` values for
    /// [`Logits::Last`], `tokens.len() * vocab` for [`Logits::All`].
    pub fn forward(
        &self,
        arena: &mut Arena,
        batch: &[SeqInput<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let bs = arena.layout().block_size;
        let l = arena.layout();
        if l.layers != self.config.layers
            || l.kv_heads != self.config.kv_heads
            || l.head_dim != self.config.head_dim
        {
            return Err(ModelError::InvalidBatch(format!(
                "arena layout {l:?} does not fit the model"
            )));
        }
        for (i, s) in batch.iter().enumerate() {
            let end = s.start + s.tokens.len();
            if s.block_table.len() * bs < end {
                return Err(ModelError::InvalidBatch(format!(
                    "sequence {i}: {} blocks of {bs} cannot hold positions up to {end}",
                    s.block_table.len()
                )));
            }
            if let Some(&b) = s.block_table.iter().find(|b| b.index() >= l.num_blocks) {
                return Err(ModelError::InvalidBatch(format!(
                    "sequence {i}: {b:?} is outside the arena"
                )));
            }
        }
        let tables = batch.iter().map(|s| s.block_table).collect();
        let mut kv = PagedKv::new(arena, tables, self.attn_shape(), Some(&self.pool));
        // NOTE: the whole step runs on the pool, so the calling thread's
        // work and every parallel region start on a pool worker: one hand-off
        // per step instead of one per matmul (121 per step for SmolLM2).
        self.pool.install(|| self.forward_with(batch, &mut kv))
    }

    /// The forward pass over any [`KvStore`] (the paged arena, or a test's
    /// contiguous reference). Block tables in `batch` are not read here.
    pub fn forward_with(
        &self,
        batch: &[SeqInput<'_>],
        kv: &mut dyn KvStore,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_impl(batch, kv, false)
    }

    /// The forward pass as a numerical reference: the weights as the file
    /// holds them (a tied output head is the stored embedding, never a
    /// requantized copy), but activations never quantized, and
    /// every matmul a dot of f32 values accumulated in f64. With a
    /// [`KvStore`] that keeps K and V in f32 and attends in f64, what is
    /// left is the model itself; quality checks compare both servers with
    /// it. Many times slower than [`Self::forward_with`].
    pub fn forward_reference(
        &self,
        batch: &[SeqInput<'_>],
        kv: &mut dyn KvStore,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_impl(batch, kv, true)
    }

    fn forward_impl(
        &self,
        batch: &[SeqInput<'_>],
        kv: &mut dyn KvStore,
        exact: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        for (seq, s) in batch.iter().enumerate() {
            if s.start + s.tokens.len() > c.context_length {
                return Err(ModelError::InvalidBatch(format!(
                    "sequence {seq} reaches position {}, past the context length {}",
                    s.start + s.tokens.len(),
                    c.context_length
                )));
            }
            for (i, t) in s.tokens.iter().enumerate() {
                if t.get() as usize >= c.vocab {
                    return Err(ModelError::InvalidBatch(format!(
                        "token id {} is outside the vocabulary of {}",
                        t.get(),
                        c.vocab
                    )));
                }
                rows.push(Row {
                    seq,
                    pos: s.start + i,
                });
                ids.push(t.get());
            }
        }
        let n = rows.len();
        if n == 0 {
            return Ok(batch
                .iter()
                .filter(|s| s.logits != Logits::None)
                .map(|_| Vec::new())
                .collect());
        }
        let (h, kvw) = (c.hidden, c.kv_heads * c.head_dim);
        let mut x = self.weights.embed.rows(&ids)?;
        let rope: Vec<Vec<(f32, f32)>> = rows.iter().map(|r| self.rope_table(r.pos)).collect();
        let mut normed = vec![0f32; n * h];
        let mut attn = vec![0f32; n * h];
        for (li, layer) in self.weights.layers.iter().enumerate() {
            for r in 0..n {
                rms_norm(
                    &x[r * h..(r + 1) * h],
                    &layer.attn_norm,
                    c.rms_eps,
                    &mut normed[r * h..(r + 1) * h],
                );
            }
            let mut qkv = project(&layer.qkv, &normed, n, &self.pool, exact)?;
            let w = h + 2 * kvw;
            for (r, row) in rows.iter().enumerate() {
                let (q, rest) = qkv[r * w..(r + 1) * w].split_at_mut(h);
                let (k, v) = rest.split_at_mut(kvw);
                self.rope(q, &rope[r]);
                self.rope(k, &rope[r]);
                kv.store(li, *row, k, v);
            }
            let q: Vec<f32> = (0..n)
                .flat_map(|r| qkv[r * w..r * w + h].iter().copied())
                .collect();
            kv.attend(li, &rows, &q, &mut attn);
            let o = linear(&layer.wo, &attn, n, &self.pool, exact)?;
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            for r in 0..n {
                rms_norm(
                    &x[r * h..(r + 1) * h],
                    &layer.ffn_norm,
                    c.rms_eps,
                    &mut normed[r * h..(r + 1) * h],
                );
            }
            let gu = project(&layer.gate_up, &normed, n, &self.pool, exact)?;
            let f = c.ffn;
            let mut act = vec![0f32; n * f];
            for r in 0..n {
                let (g, u) = gu[r * 2 * f..(r + 1) * 2 * f].split_at(f);
                crate::attention::swiglu(g, u, &mut act[r * f..(r + 1) * f]);
            }
            let d = linear(&layer.down, &act, n, &self.pool, exact)?;
            for (xv, dv) in x.iter_mut().zip(&d) {
                *xv += dv;
            }
        }
        // The rows whose logits are asked for: each sequence's last, or
        // all of its rows.
        let mut out_rows = Vec::new();
        let mut r = 0;
        for s in batch {
            let rows = r..r + s.tokens.len();
            r = rows.end;
            match s.logits {
                Logits::None => {}
                Logits::Last => out_rows.extend(rows.last()),
                Logits::All => out_rows.extend(rows),
            }
        }
        let mut hs = vec![0f32; out_rows.len() * h];
        for (i, &r) in out_rows.iter().enumerate() {
            rms_norm(
                &x[r * h..(r + 1) * h],
                &self.weights.output_norm,
                c.rms_eps,
                &mut hs[i * h..(i + 1) * h],
            );
        }
        let logits = if out_rows.is_empty() {
            Vec::new()
        } else {
            // The reference runs the file's own output head: with tied
            // embeddings that is the embedding matrix as stored, not the
            // Q8_0 copy a Q4_1 or Q5 embedding is requantized to for speed.
            let head = if exact && c.tied_embeddings {
                &self.weights.embed
            } else {
                &self.weights.output
            };
            linear(head, &hs, out_rows.len(), &self.pool, exact)?
        };
        let mut out = Vec::new();
        let mut at = 0;
        for s in batch {
            let n = match s.logits {
                Logits::None => continue,
                Logits::Last => s.tokens.len().min(1),
                Logits::All => s.tokens.len(),
            };
            out.push(logits[at..at + n * c.vocab].to_vec());
            at += n * c.vocab;
        }
        Ok(out)
    }

    /// The (sin, cos) pairs RoPE needs at `pos`, computed once per row and
    /// step and shared by Q, K and every layer.
    fn rope_table(&self, pos: usize) -> Vec<(f32, f32)> {
        let p = pos as f32;
        self.inv_freq.iter().map(|f| (p * f).sin_cos()).collect()
    }

    /// Interleaved RoPE over every head in `x`, with `cs` from [`Self::rope_table`].
    fn rope(&self, x: &mut [f32], cs: &[(f32, f32)]) {
        let hd = self.config.head_dim;
        for head in x.chunks_exact_mut(hd) {
            for (i, &(sin, cos)) in cs.iter().enumerate() {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos - b * sin;
                head[2 * i + 1] = a * sin + b * cos;
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
