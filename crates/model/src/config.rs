//! The model's typed configuration, read from GGUF metadata.

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::ModelError;

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// Adjacent pairs `(2i, 2i+1)`: the GGUF llama convention (llama.cpp's
    /// "NORM"); the converter permutes Q and K rows to match.
    Interleaved,
}

/// A llama-family model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer layers.
    pub layers: usize,
    /// Embedding width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA groups).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// FFN width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Trained context length.
    pub context_length: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Dimensions RoPE rotates (the first `rope_dims` of each head).
    pub rope_dims: usize,
    /// RoPE pairing.
    pub rope_pairing: RopePairing,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// The output layer is the token embedding.
    pub tied_embeddings: bool,
}

fn get<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

pub(crate) fn meta_u32(c: &Content, key: &str) -> Result<usize, ModelError> {
    let missing = || ModelError::MissingMetadata {
        key: key.into(),
        expected: "integer",
    };
    let v = get(c, key).ok_or_else(missing)?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        _ => return Err(missing()),
    };
    usize::try_from(n).map_err(|_| missing())
}

fn meta_f32(c: &Content, key: &str) -> Result<f32, ModelError> {
    match get(c, key) {
        Some(Value::F32(x)) => Ok(*x),
        Some(Value::F64(x)) => Ok(*x as f32),
        _ => Err(ModelError::MissingMetadata {
            key: key.into(),
            expected: "float",
        }),
    }
}

pub(crate) fn meta_str<'a>(c: &'a Content, key: &str) -> Result<&'a str, ModelError> {
    match get(c, key) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(ModelError::MissingMetadata {
            key: key.into(),
            expected: "string",
        }),
    }
}

impl LlamaConfig {
    /// Reads the configuration, refusing anything that is not llama.
    pub fn from_gguf(c: &Content) -> Result<Self, ModelError> {
        let arch = meta_str(c, "general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let hidden = meta_u32(c, "llama.embedding_length")?;
        let heads = meta_u32(c, "llama.attention.head_count")?;
        let kv_heads = meta_u32(c, "llama.attention.head_count_kv").unwrap_or(heads);
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !hidden.is_multiple_of(heads)
        {
            return Err(ModelError::InvalidConfig(format!(
                "{heads} query heads, {kv_heads} KV heads, width {hidden}: heads must divide the width and KV heads the heads"
            )));
        }
        let head_dim = meta_u32(c, "llama.attention.key_length").unwrap_or(hidden / heads);
        let rope_dims = meta_u32(c, "llama.rope.dimension_count").unwrap_or(head_dim);
        if head_dim * heads != hidden || !rope_dims.is_multiple_of(2) || rope_dims > head_dim {
            return Err(ModelError::InvalidConfig(format!(
                "head dim {head_dim} x {heads} heads != width {hidden}, or RoPE dims {rope_dims} invalid"
            )));
        }
        let vocab = match meta_u32(c, "llama.vocab_size") {
            Ok(v) => v,
            Err(_) => match get(c, "tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => {
                    return Err(ModelError::MissingMetadata {
                        key: "llama.vocab_size".into(),
                        expected: "integer",
                    });
                }
            },
        };
        let cfg = Self {
            layers: meta_u32(c, "llama.block_count")?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn: meta_u32(c, "llama.feed_forward_length")?,
            vocab,
            context_length: meta_u32(c, "llama.context_length")?,
            rope_theta: meta_f32(c, "llama.rope.freq_base").unwrap_or(10_000.0),
            rope_dims,
            rope_pairing: RopePairing::Interleaved,
            rms_eps: meta_f32(c, "llama.attention.layer_norm_rms_epsilon")?,
            tied_embeddings: !c.tensor_infos.contains_key("output.weight"),
        };
        if cfg.layers == 0 || cfg.ffn == 0 || cfg.vocab == 0 || cfg.context_length == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "zero-sized dimension in {cfg:?}"
            )));
        }
        Ok(cfg)
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}
