//! A frozen linear layer (dense or NF4, with an optional frozen bias) with an optional LoRA
//! bypass.
use crate::dropout::MaskKey;
use crate::lora::{LoraAdapter, LoraSaved};
use crate::quant::nf4::{self, Nf4Tensor};
use anyhow::Result;
use tch::{Kind, Tensor};

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
    /// `[out]` in the compute dtype (Qwen2's q/k/v), frozen like the weight.
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl QLinear {
    /// `x · Wᵀ` (+ LoRA, without dropout) under autograd: the padded reference forward. The
    /// NF4 weight is dequantised to `x`'s dtype for this call; autograd keeps that copy as
    /// long as the graph that uses it. Training uses [`Self::forward_saved`] instead.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = self.frozen(x)?;
        Ok(match &self.lora {
            Some(l) => base + l.forward(x, x.kind()),
            None => base,
        })
    }

    /// `x · Wᵀ + b` without LoRA; a few rows outside autograd take the fused NF4 kernel.
    fn frozen(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref();
        Ok(match &self.weight {
            FrozenWeight::Dense(w) => x.linear(w, b),
            FrozenWeight::Nf4(q) => {
                let rows = x.numel() as i64 / x.size().last().copied().unwrap_or(1).max(1);
                if !x.requires_grad() && rows <= SMALL_ROWS {
                    let y = nf4::matmul_small(x, q)?;
                    match b {
                        Some(b) => y + b,
                        None => y,
                    }
                } else {
                    x.linear(&nf4::dequantize(q, x.kind())?, b)
                }
            }
        })
    }

    /// The frozen weight `[out, in]` in `kind`, dequantised for this call.
    fn dense(&self, kind: Kind) -> Result<Tensor> {
        Ok(match &self.weight {
            FrozenWeight::Dense(w) => w.shallow_clone(),
            FrozenWeight::Nf4(q) => nf4::dequantize(q, kind)?,
        })
    }

    /// `x · Wᵀ` (+ LoRA) for rows `x` `[N, in]` outside autograd (`dropout`: `None`
    /// for evaluation), keeping what [`Self::backward`] needs: nothing of the frozen weight
    /// (it is dequantised again there), only the LoRA branch's `[N, r]` hidden rows.
    pub fn forward_saved(
        &self,
        x: &Tensor,
        dropout: Option<MaskKey>,
    ) -> Result<(Tensor, Option<LoraSaved>)> {
        let base = self.frozen(x)?;
        Ok(match &self.lora {
            Some(l) => {
                let (y, saved) = l.forward_saved(x, dropout, x.kind())?;
                (base + y, Some(saved))
            }
            None => (base, None),
        })
    }

    /// The gradient of the input rows for the output gradient `dy` `[N, out]` (`dy · W`, as
    /// autograd computes it for `linear`), accumulating the LoRA gradients. `x` rebuilds the
    /// forward's input rows; it is called only when there is a LoRA branch.
    pub fn backward(
        &self,
        saved: Option<&LoraSaved>,
        x: impl FnOnce() -> Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let dx = dy.mm(&self.dense(dy.kind())?);
        Ok(match (&self.lora, saved) {
            (Some(l), Some(s)) => dx + l.backward(s, &x(), dy)?,
            _ => dx,
        })
    }

    /// Only the LoRA gradients, for a layer whose input needs no gradient.
    pub fn backward_params_only(
        &self,
        saved: Option<&LoraSaved>,
        x: impl FnOnce() -> Tensor,
        dy: &Tensor,
    ) -> Result<()> {
        if let (Some(l), Some(s)) = (&self.lora, saved) {
            let _input_grad = l.backward(s, &x(), dy)?;
        }
        Ok(())
    }
}
