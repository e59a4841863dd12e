//! A frozen linear layer (dense or NF4, no bias) with an optional LoRA bypass.
use crate::lora::LoraAdapter;
use crate::quant::nf4::{self, Nf4Tensor};
use anyhow::Result;
use tch::Tensor;

/// Rows up to which the no-grad path uses `nf4::matmul_small` instead of dequantising.
const SMALL_ROWS: i64 = 16;

#[derive(Debug)]
pub enum FrozenWeight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    Nf4(Nf4Tensor),
}

impl FrozenWeight {
    pub fn out_features(&self) -> i64 {
        match self {
            FrozenWeight::Dense(w) => w.size()[0],
            FrozenWeight::Nf4(q) => q.shape[0],
        }
    }

    pub fn in_features(&self) -> i64 {
        match self {
            FrozenWeight::Dense(w) => w.size()[1],
            FrozenWeight::Nf4(q) => q.shape[1],
        }
    }

    /// Bytes held on the device.
    pub fn nbytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.numel() * w.kind().elt_size_in_bytes(),
            FrozenWeight::Nf4(q) => q.nbytes(),
        }
    }
}

#[derive(Debug)]
pub struct QLinear {
    pub weight: FrozenWeight,
    pub lora: Option<LoraAdapter>,
}

impl QLinear {
    /// `x · Wᵀ` (+ LoRA). The NF4 weight is dequantised to `x`'s dtype for this call only:
    /// autograd keeps that copy just as long as the graph that uses it (one decoder layer
    /// under gradient checkpointing) to pass the gradient on to `x`; W itself never gets one.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let base = match &self.weight {
            FrozenWeight::Dense(w) => x.linear::<Tensor>(w, None),
            FrozenWeight::Nf4(q) => {
                let rows = x.numel() as i64 / x.size().last().copied().unwrap_or(1).max(1);
                let needs_graph = x.requires_grad();
                if !needs_graph && rows <= SMALL_ROWS {
                    nf4::matmul_small(x, q)?
                } else {
                    let w = nf4::dequantize(q, x.kind())?;
                    x.linear::<Tensor>(&w, None)
                }
            }
        };
        Ok(match &self.lora {
            Some(l) => base + l.forward(x, train, x.kind()),
            None => base,
        })
    }
}
