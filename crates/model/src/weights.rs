//! Loading a GGUF file's weights: typed checks, load-time requantization
//! and fused projections.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module};
use sha2::{Digest, Sha256};

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::quant::{Q41Matrix, Q80Matrix};

/// An opened GGUF file: its metadata and tensor directory, and a reader.
pub struct Gguf {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Gguf {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(io(path))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::BadGguf {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The parsed metadata and tensor directory.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        check_dtype(name, info.ggml_dtype)?;
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::BadGguf {
                path: self.path.display().to_string(),
                reason: format!("tensor {name}: {e}"),
            })
    }
}

fn check_dtype(name: &str, dtype: GgmlDType) -> Result<(), ModelError> {
    use GgmlDType::*;
    match dtype {
        F32 | F16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K => Ok(()),
        other => Err(ModelError::UnsupportedTensorType {
            tensor: name.into(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], ModelError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Whether a weight type is requantized to Q8_0 at load.
///
/// NOTE: candle's vector-dot kernels for Q4_1, Q5_0 and Q5_1 are scalar on
/// every CPU; its Q8_0 kernel uses AVX2/NEON. Q4_1 runs on our own kernel
/// (`quant.rs`) unless `requantize_q4_1` asks for candle's Q8_0 path; Q5_0
/// and Q5_1 are always requantized.
pub fn requantized_type(dtype: GgmlDType, requantize_q4_1: bool) -> Option<GgmlDType> {
    match dtype {
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => Some(GgmlDType::Q8_0),
        GgmlDType::Q4_1 if requantize_q4_1 => Some(GgmlDType::Q8_0),
        _ => None,
    }
}

/// A linear layer `y = x W^T` over quantized weights, possibly the fusion of
/// several (Q, K and V; gate and up) into one matmul. Clones share the
/// weights (the tied output layer is the embedding's matrix).
#[derive(Clone)]
pub(crate) struct Linear {
    kernel: Kernel,
    /// Output width.
    pub(crate) out: usize,
    /// Input width.
    pub(crate) input: usize,
}

#[derive(Clone)]
enum Kernel {
    Candle(QMatMul),
    Q41(Arc<Q41Matrix>),
    Q80(Arc<Q80Matrix>),
}

impl Linear {
    /// `rows` rows of `x` (`rows * input` values) times the weights.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        rows: usize,
        pool: &rayon::ThreadPool,
    ) -> Result<Vec<f32>, ModelError> {
        debug_assert_eq!(x.len(), rows * self.input);
        match &self.kernel {
            Kernel::Q41(m) => Ok(m.matmul(x, rows, pool)),
            Kernel::Q80(m) => Ok(m.matmul(x, rows, pool)),
            Kernel::Candle(mm) => {
                let t = candle_core::Tensor::from_slice(x, (rows, self.input), &Device::Cpu)?;
                Ok(mm.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// Rows `ids` of the weight matrix as floats (`ids.len() x input`): the
    /// embedding lookup.
    pub(crate) fn rows(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut out = vec![0f32; ids.len() * self.input];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.input)) {
            match &self.kernel {
                Kernel::Q41(m) => m.dequantize_row(id as usize, o),
                Kernel::Q80(m) => m.dequantize_row(id as usize, o),
                Kernel::Candle(QMatMul::QTensor(t)) => {
                    let ids = candle_core::Tensor::new(&[id], &Device::Cpu)?;
                    let row = t.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?;
                    o.copy_from_slice(&row);
                }
                Kernel::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                    let row = t.get(id as usize)?.to_dtype(candle_core::DType::F32)?;
                    o.copy_from_slice(&row.to_vec1::<f32>()?);
                }
            }
        }
        Ok(out)
    }

    /// The same product with nothing rounded but the weights themselves:
    /// activations stay f32 and every dot accumulates in f64. The
    /// reference that [`crate::LlamaModel::forward_reference`] runs; slow.
    pub(crate) fn forward_exact(
        &self,
        x: &[f32],
        rows: usize,
        pool: &rayon::ThreadPool,
    ) -> Result<Vec<f32>, ModelError> {
        use rayon::prelude::*;
        debug_assert_eq!(x.len(), rows * self.input);
        let (n, k) = (self.out, self.input);
        let dense: Option<Vec<f32>> = match &self.kernel {
            Kernel::Candle(QMatMul::QTensor(t)) => {
                Some(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
            }
            Kernel::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Some(
                t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ),
            _ => None,
        };
        let weight_row = |j: usize, w: &mut [f32]| match (&self.kernel, &dense) {
            (Kernel::Q41(m), _) => m.dequantize_row(j, w),
            (Kernel::Q80(m), _) => m.dequantize_row(j, w),
            (_, Some(d)) => w.copy_from_slice(&d[j * k..(j + 1) * k]),
            (_, None) => unreachable!("a candle kernel has its dense copy"),
        };
        // Column j of the output for every row: one weight row at a time.
        let cols: Vec<Vec<f32>> = pool.install(|| {
            (0..n)
                .into_par_iter()
                .map_init(
                    || vec![0f32; k],
                    |w, j| {
                        weight_row(j, w);
                        x.chunks_exact(k)
                            .map(|xr| {
                                xr.iter()
                                    .zip(w.iter())
                                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                    .sum::<f64>() as f32
                            })
                            .collect()
                    },
                )
                .collect()
        });
        let mut out = vec![0f32; rows * n];
        for (j, col) in cols.iter().enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * n + j] = *v;
            }
        }
        Ok(out)
    }

    /// Bytes of weights this layer reads per matmul.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.kernel {
            Kernel::Q41(m) => m.bytes(),
            Kernel::Q80(m) => m.bytes(),
            Kernel::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Kernel::Candle(_) => self.out * self.input * 4,
        }
    }
}

/// Our own kernel for the formats it has (Q4_1, Q8_0), candle's otherwise.
fn kernel_for(t: Arc<QTensor>, rows: usize, cols: usize) -> Result<Kernel, ModelError> {
    Ok(match t.dtype() {
        GgmlDType::Q4_1 => Kernel::Q41(Arc::new(Q41Matrix::from_ggml(&t.data()?, rows, cols)?)),
        GgmlDType::Q8_0 => Kernel::Q80(Arc::new(Q80Matrix::from_ggml(&t.data()?, rows, cols)?)),
        _ => Kernel::Candle(QMatMul::from_arc(t)?),
    })
}

/// Loads `names` (each `rows_i x input`) as one linear layer. Weights whose
/// type is requantized are fused into one Q8_0 matrix; any other type keeps
/// its own encoding, so several parts are fused only when that is lossless.
fn load_linear(
    g: &mut Gguf,
    names: &[String],
    rows: &[usize],
    input: usize,
    requantize: bool,
    requantized: &mut Vec<String>,
) -> Result<Vec<Linear>, ModelError> {
    let target = |d: GgmlDType| requantized_type(d, requantize);
    let mut parts = Vec::with_capacity(names.len());
    for (name, &r) in names.iter().zip(rows) {
        let t = g.tensor(name)?;
        let dims = t.shape().dims().to_vec();
        if dims != [r, input] {
            return Err(ModelError::ShapeMismatch {
                tensor: name.clone(),
                expected: vec![r, input],
                actual: dims,
            });
        }
        parts.push(t);
    }
    let out: usize = rows.iter().sum();
    // Q4_1 rows concatenate losslessly, block for block.
    if !requantize && parts.iter().all(|t| t.dtype() == GgmlDType::Q4_1) {
        let mut bytes = Vec::new();
        for t in &parts {
            bytes.extend_from_slice(&t.data()?);
        }
        let kernel = Kernel::Q41(Arc::new(Q41Matrix::from_ggml(&bytes, out, input)?));
        return Ok(vec![Linear { kernel, out, input }]);
    }
    let fusable = parts
        .iter()
        .all(|t| target(t.dtype()).is_some() || t.dtype() == GgmlDType::Q8_0);
    if fusable {
        let mut dense = Vec::with_capacity(parts.len());
        for (t, name) in parts.iter().zip(names) {
            if target(t.dtype()).is_some() {
                requantized.push(format!("{name}:{:?}->Q8_0", t.dtype()));
            }
            dense.push(t.dequantize(&Device::Cpu)?);
        }
        let all = candle_core::Tensor::cat(&dense, 0)?;
        let q = QTensor::quantize(&all, GgmlDType::Q8_0)?;
        return Ok(vec![Linear {
            kernel: kernel_for(Arc::new(q), out, input)?,
            out,
            input,
        }]);
    }
    parts
        .into_iter()
        .zip(rows)
        .map(|(t, &out)| {
            Ok(Linear {
                kernel: kernel_for(Arc::new(t), out, input)?,
                out,
                input,
            })
        })
        .collect()
}

/// One transformer layer's weights.
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    /// Q, K and V, fused when lossless (then one part of width q+k+v).
    pub(crate) qkv: Vec<Linear>,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Vec<f32>,
    /// Gate and up, fused when lossless.
    pub(crate) gate_up: Vec<Linear>,
    pub(crate) down: Linear,
}

/// All weights of a llama model.
pub(crate) struct Weights {
    /// The token embedding, as a matrix of `vocab` rows.
    pub(crate) embed: Linear,
    pub(crate) output: Linear,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    /// What was requantized at load, for the fingerprint and the logs.
    pub(crate) requantized: Vec<String>,
}

fn vector(g: &mut Gguf, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = g.tensor(name)?;
    let v = t
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if v.len() != len {
        return Err(ModelError::ShapeMismatch {
            tensor: name.into(),
            expected: vec![len],
            actual: t.shape().dims().to_vec(),
        });
    }
    Ok(v)
}

impl Weights {
    pub(crate) fn load(
        g: &mut Gguf,
        c: &LlamaConfig,
        requantize: bool,
    ) -> Result<Self, ModelError> {
        let mut requantized = Vec::new();
        let (h, kvw, f) = (c.hidden, c.kv_heads * c.head_dim, c.ffn);
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let qkv = load_linear(
                g,
                &[n("attn_q"), n("attn_k"), n("attn_v")],
                &[h, kvw, kvw],
                h,
                requantize,
                &mut requantized,
            )?;
            let wo = load_linear(
                g,
                &[n("attn_output")],
                &[h],
                h,
                requantize,
                &mut requantized,
            )?
            .remove(0);
            let gate_up = load_linear(
                g,
                &[n("ffn_gate"), n("ffn_up")],
                &[f, f],
                h,
                requantize,
                &mut requantized,
            )?;
            let down =
                load_linear(g, &[n("ffn_down")], &[h], f, requantize, &mut requantized)?.remove(0);
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm"), h)?,
                qkv,
                wo,
                ffn_norm: vector(g, &n("ffn_norm"), h)?,
                gate_up,
                down,
            });
        }
        let embed = g.tensor("token_embd.weight")?;
        let dims = embed.shape().dims().to_vec();
        if dims != [c.vocab, h] {
            return Err(ModelError::ShapeMismatch {
                tensor: "token_embd.weight".into(),
                expected: vec![c.vocab, h],
                actual: dims,
            });
        }
        let dtype = embed.dtype();
        let embed_q = Arc::new(embed);
        let embed = Linear {
            kernel: kernel_for(embed_q.clone(), c.vocab, h)?,
            out: c.vocab,
            input: h,
        };
        let output = if c.tied_embeddings {
            if let Some(to) = requantized_type(dtype, true) {
                requantized.push(format!("output(tied):{dtype:?}->{to:?}"));
                let q = QTensor::quantize(&embed_q.dequantize(&Device::Cpu)?, to)?;
                Linear {
                    kernel: kernel_for(Arc::new(q), c.vocab, h)?,
                    out: c.vocab,
                    input: h,
                }
            } else {
                embed.clone()
            }
        } else {
            load_linear(
                g,
                &["output.weight".into()],
                &[c.vocab],
                h,
                requantize,
                &mut requantized,
            )?
            .remove(0)
        };
        Ok(Self {
            embed,
            output,
            output_norm: vector(g, "output_norm.weight", h)?,
            layers,
            requantized,
        })
    }
}
