//! A tiny random-weight llama GGUF, same format and tokenizer shape as the
//! default model (byte-level BPE with the `smollm` pre-tokenizer, ChatML
//! control tokens, Q4_1 matrices, a tied Q8_0 embedding), so most model and
//! engine tests run in milliseconds.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The tiny model's shape.
#[derive(Clone, Copy, Debug)]
pub struct TinyConfig {
    /// Layers.
    pub layers: usize,
    /// Width (a multiple of 32).
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// FFN width (a multiple of 32).
    pub ffn: usize,
    /// Context length.
    pub context: usize,
    /// Seed of the random weights: two seeds, two different models.
    pub seed: u64,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            context: 512,
            seed: 1,
        }
    }
}

/// The control tokens, as in SmolLM2: ids 0, 1, 2.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A few merges so BPE does some work.
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "w"),
];

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's byte-to-unicode table (the inverse lives in the model crate).
fn byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(b)
            } else {
                let c = char::from_u32(next).expect("valid code point");
                next += 1;
                c
            }
        })
        .collect()
}

/// The tiny vocabulary: 3 control tokens, 256 bytes, then the merges.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend(byte_chars().into_iter().map(String::from));
    v.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    v
}

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("shape matches data")
}

fn q(t: &Tensor, dtype: GgmlDType) -> QTensor {
    QTensor::quantize(t, dtype).expect("dimensions are multiples of the block size")
}

/// Writes the tiny model to `path`.
pub fn write(path: &Path, c: TinyConfig) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let vocab = vocab();
    let head_dim = c.hidden / c.heads;
    let kvw = c.kv_heads * head_dim;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let norm = |rng: &mut ChaCha8Rng, n: usize| {
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(0.8..1.2)).collect();
        q(
            &Tensor::from_vec(data, (n,), &Device::Cpu).expect("shape"),
            GgmlDType::F32,
        )
    };
    let s_h = 1.0 / (c.hidden as f32).sqrt();
    let s_f = 1.0 / (c.ffn as f32).sqrt();
    for i in 0..c.layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        tensors.push((n("attn_norm"), norm(&mut rng, c.hidden)));
        tensors.push((
            n("attn_q"),
            q(
                &random(&mut rng, c.hidden, c.hidden, s_h * 2.0),
                GgmlDType::Q4_1,
            ),
        ));
        tensors.push((
            n("attn_k"),
            q(&random(&mut rng, kvw, c.hidden, s_h * 2.0), GgmlDType::Q4_1),
        ));
        tensors.push((
            n("attn_v"),
            q(&random(&mut rng, kvw, c.hidden, s_h), GgmlDType::Q4_1),
        ));
        tensors.push((
            n("attn_output"),
            q(&random(&mut rng, c.hidden, c.hidden, s_h), GgmlDType::Q4_1),
        ));
        tensors.push((n("ffn_norm"), norm(&mut rng, c.hidden)));
        tensors.push((
            n("ffn_gate"),
            q(&random(&mut rng, c.ffn, c.hidden, s_h), GgmlDType::Q4_1),
        ));
        tensors.push((
            n("ffn_up"),
            q(&random(&mut rng, c.ffn, c.hidden, s_h), GgmlDType::Q4_1),
        ));
        tensors.push((
            n("ffn_down"),
            q(&random(&mut rng, c.hidden, c.ffn, s_f), GgmlDType::Q4_1),
        ));
    }
    tensors.push(("output_norm.weight".into(), norm(&mut rng, c.hidden)));
    tensors.push((
        "token_embd.weight".into(),
        q(
            &random(&mut rng, vocab.len(), c.hidden, 1.0),
            GgmlDType::Q8_0,
        ),
    ));

    let mut types = vec![Value::I32(3); SPECIALS.len()];
    types.extend(std::iter::repeat_n(
        Value::I32(1),
        vocab.len() - SPECIALS.len(),
    ));
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "general.name",
            Value::String(format!("strata-tiny-{}", c.seed)),
        ),
        ("llama.block_count", Value::U32(c.layers as u32)),
        ("llama.context_length", Value::U32(c.context as u32)),
        ("llama.embedding_length", Value::U32(c.hidden as u32)),
        ("llama.feed_forward_length", Value::U32(c.ffn as u32)),
        ("llama.attention.head_count", Value::U32(c.heads as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(c.kv_heads as u32),
        ),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(vocab.len() as u32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|s| Value::String(s.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String(CHATML.into())),
    ];
    let mdr: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let tr: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut f, &mdr, &tr).map_err(std::io::Error::other)?;
    std::io::Write::flush(&mut f)
}

/// Writes the tiny model for `c` once per process into a temporary
/// directory and returns its path.
pub fn path(c: TinyConfig) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    let p = dir.join(format!(
        "tiny-{}-{}x{}-{}.gguf",
        c.seed, c.layers, c.hidden, c.heads
    ));
    if !p.exists() {
        let tmp = p.with_extension(
            format!("tmp{:?}", std::thread::current().id()).replace(['(', ')'], ""),
        );
        write(&tmp, c).expect("the tiny model can be written");
        std::fs::rename(&tmp, &p).expect("rename within a directory");
    }
    p
}
