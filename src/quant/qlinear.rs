//! A frozen linear layer (dense or NF4, with an optional frozen bias) with an optional LoRA
//! bypass, plain or DoRA.
//!
//! DoRA, as PEFT's `DoraLinearVariant.forward` (`g = m / ‖W + s·B·A‖`, the norm detached):
//! `y = base + (g − 1)·W·x̃ + g·s·B·A·x̃`, where `base = W·x + b` is the frozen output and
//! `x̃` the LoRA branch's dropped-out rows (without dropout `W·x̃ = base − b`, which PEFT
//! reuses). Its backward: `∂m = Σ_rows ∂y·(W·x̃ + s·B·A·x̃)/‖·‖`; the branch gets `g·∂y`; the
//! input gets `Wᵀ·∂y + dropout(Wᵀ·((g − 1)·∂y))` (without dropout `Wᵀ·(g·∂y)`). The norm
//! needs W dense in fp32, so a DoRA layer dequantises its weight for every pass.
use crate::dropout::MaskKey;
use crate::lora::{LoraAdapter, LoraSaved};
use crate::profile::{scope, Part};
use crate::quant::nf4::{self, Nf4Tensor};
use anyhow::Result;
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

/// Rows up to which the no-grad path uses `nf4::matmul_small` instead of dequantising.
const SMALL_ROWS: i64 = 16;

/// Whether `x` (`[.., in]`) has few enough rows for the fused NF4 kernel.
pub fn few_rows(x: &Tensor) -> bool {
    let rows = x.numel() as i64 / x.size().last().copied().unwrap_or(1).max(1);
    rows <= SMALL_ROWS
}

/// The type the frozen matmuls multiply in, for activations of `kind` on `device`. bf16 on
/// a CPU without bf16 matrix instructions multiplies in fp32 (operands widened, the product
/// rounded to bf16 once): torch's own bf16 GEMM there also accumulates in fp32 and rounds
/// once (`tests/qlinear.rs` holds the two within a bf16 rounding), at a seventh of fp32's
/// speed (bench row 6).
pub fn gemm_kind(kind: Kind, device: Device) -> Kind {
    if kind == Kind::BFloat16 && device == Device::Cpu && !crate::hardware::cpu_has_bf16_matmul() {
        Kind::Float
    } else {
        kind
    }
}

/// `x · wᵀ (+ b)` multiplied in `w`'s type, returned in `x`'s.
pub fn linear_in(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let k = w.kind();
    if x.kind() == k {
        return x.linear(w, b);
    }
    x.to_kind(k)
        .linear(w, b.map(|b| b.to_kind(k)).as_ref())
        .to_kind(x.kind())
}

/// `dy · w` multiplied in `w`'s type, returned in `dy`'s.
pub fn mm_in(dy: &Tensor, w: &Tensor) -> Tensor {
    let k = w.kind();
    if dy.kind() == k {
        return dy.mm(w);
    }
    dy.to_kind(k).mm(w).to_kind(dy.kind())
}

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

/// One reused operand buffer for the dequantised frozen weights of a pass: every projection
/// of every layer dequantises into (a view of) the same allocation, instead of allocating,
/// faulting in and freeing a fresh weight-sized tensor per call.
#[derive(Debug, Default)]
pub struct Scratch(RefCell<Option<Tensor>>);

impl Scratch {
    /// A contiguous `[rows, cols]` view of the buffer (grown when too small). The view stays
    /// valid after the buffer grows; what it holds is overwritten by the next `take`.
    pub fn take(&self, rows: i64, cols: i64, kind: Kind, device: Device) -> Tensor {
        let n = rows * cols;
        let mut slot = self.0.borrow_mut();
        let fits = slot
            .as_ref()
            .is_some_and(|b| b.kind() == kind && b.device() == device && b.numel() as i64 >= n);
        if !fits {
            *slot = Some(Tensor::empty([n], (kind, device)));
        }
        slot.as_ref()
            .expect("just filled")
            .narrow(0, 0, n)
            .view([rows, cols])
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
        let base = self.frozen(x, None)?;
        Ok(match &self.lora {
            Some(l) => match &l.magnitude {
                Some(m) => {
                    let w = self.dense_in(Kind::Float, &Scratch::default())?;
                    let g = m / l.weight_norm(&w);
                    let base = base.to_kind(Kind::Float);
                    let plain = self.without_bias(&base);
                    let y = &base + (&g - 1.0) * plain + &g * l.forward(x, Kind::Float);
                    y.to_kind(x.kind())
                }
                None => base + l.forward(x, x.kind()),
            },
            None => base,
        })
    }

    /// `y − b` (the frozen product without its bias), in `y`'s type.
    fn without_bias(&self, y: &Tensor) -> Tensor {
        match &self.bias {
            Some(b) => y - b.to_kind(y.kind()),
            None => y.shallow_clone(),
        }
    }

    /// Whether the adapter is DoRA.
    pub fn is_dora(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.magnitude.is_some())
    }

    /// Bytes a dense copy of an NF4 weight would take in `kind` (0 for a dense weight).
    pub fn dense_bytes(&self, kind: Kind) -> u64 {
        match &self.weight {
            FrozenWeight::Dense(_) => 0,
            FrozenWeight::Nf4(q) => {
                (q.shape[0] * q.shape[1]) as u64 * kind.elt_size_in_bytes() as u64
            }
        }
    }

    /// For inference only: replaces an NF4 weight by its dequantisation in `kind` (the very
    /// values every pass would dequantise, computed once), and in fp32 folds the LoRA pair in
    /// (`W + s·B·A`, as `merge` does; in 16 bits the pair stays apart, since rounding the sum
    /// to 16 bits would erase small updates).
    pub fn densify(&mut self, kind: Kind) -> Result<()> {
        if let FrozenWeight::Nf4(q) = &self.weight {
            self.weight = FrozenWeight::Dense(nf4::dequantize(q, kind)?);
        }
        if kind == Kind::Float {
            if let (FrozenWeight::Dense(w), Some(l)) = (&self.weight, &self.lora) {
                self.weight = FrozenWeight::Dense(match &l.magnitude {
                    Some(m) => crate::lora::fold_dora(w, &l.a, &l.b, l.scale, m),
                    None => crate::lora::fold(w, &l.a, &l.b, l.scale),
                });
                self.lora = None;
            }
        }
        Ok(())
    }

    /// `x · Wᵀ + b` without LoRA. A few rows outside autograd take the fused NF4 kernel;
    /// more dequantise the weight, into `scratch` when given (the training pass), else into
    /// a fresh tensor that autograd may keep (the padded reference forward).
    fn frozen(&self, x: &Tensor, scratch: Option<&Scratch>) -> Result<Tensor> {
        let b = self.bias.as_ref();
        if let FrozenWeight::Nf4(q) = &self.weight {
            if !x.requires_grad() && few_rows(x) {
                let _p = scope(Part::Matmul);
                let y = nf4::matmul_small(x, q)?;
                return Ok(match b {
                    Some(b) => y + b,
                    None => y,
                });
            }
        }
        let kind = gemm_kind(x.kind(), x.device());
        let w = self.dense_in(kind, scratch.unwrap_or(&Scratch::default()))?;
        let _p = scope(Part::Matmul);
        Ok(linear_in(x, &w, b))
    }

    /// The frozen weight `[out, in]` in `kind`: a dense weight as it is (converted if it is
    /// held in another type), an NF4 weight dequantised into `scratch` (valid until the
    /// scratch's next use).
    pub fn dense_in(&self, kind: Kind, scratch: &Scratch) -> Result<Tensor> {
        Ok(match &self.weight {
            FrozenWeight::Dense(w) if w.kind() != kind => w.to_kind(kind),
            FrozenWeight::Dense(w) => w.shallow_clone(),
            FrozenWeight::Nf4(q) => {
                let _p = scope(Part::Dequantize);
                let mut w = scratch.take(q.shape[0], q.shape[1], kind, q.device());
                nf4::dequantize_into(q, &mut w)?;
                w
            }
        })
    }

    /// `x · Wᵀ` (+ LoRA) for rows `x` `[N, in]` outside autograd (`dropout`: `None`
    /// for evaluation), keeping what [`Self::backward`] needs: nothing of the frozen weight
    /// (it is dequantised again there), only the LoRA branch's `[N, r]` hidden rows.
    pub fn forward_saved(
        &self,
        x: &Tensor,
        dropout: Option<MaskKey>,
        scratch: &Scratch,
    ) -> Result<(Tensor, Option<LoraSaved>)> {
        // DoRA needs the fp32 weight for its norm: when the product is fp32 too, one
        // dequantisation serves both.
        let dora_fp32 = self.is_dora() && gemm_kind(x.kind(), x.device()) == Kind::Float;
        let (base, w32) = if dora_fp32 {
            let w = self.dense_in(Kind::Float, &Scratch::default())?;
            let _p = scope(Part::Matmul);
            (linear_in(x, &w, self.bias.as_ref()), Some(w))
        } else {
            (self.frozen(x, Some(scratch))?, None)
        };
        Ok(match &self.lora {
            Some(l) if l.magnitude.is_some() => {
                let (y, saved) = self.dora_forward(l, x, &base, dropout, w32)?;
                (y, Some(saved))
            }
            Some(l) => {
                let _p = scope(Part::Lora);
                let (y, saved) = l.forward_saved(x, dropout, x.kind())?;
                (base + y, Some(saved))
            }
            None => (base, None),
        })
    }

    /// DoRA's output for rows `x` with the frozen output `base` (module comment).
    fn dora_forward(
        &self,
        l: &LoraAdapter,
        x: &Tensor,
        base: &Tensor,
        dropout: Option<MaskKey>,
        w32: Option<Tensor>,
    ) -> Result<(Tensor, LoraSaved)> {
        let _p = scope(Part::Lora);
        let w = match w32 {
            Some(w) => w,
            None => self.dense_in(Kind::Float, &Scratch::default())?,
        };
        let (branch, mut saved) = l.forward_saved(x, dropout, Kind::Float)?;
        let norm = l.weight_norm(&w);
        let m = l.magnitude.as_ref().map(Tensor::detach);
        let g = m.map_or_else(|| norm.ones_like(), |m| m / &norm);
        let basef = base.to_kind(Kind::Float);
        let plain = if LoraAdapter::dropped_out(&saved) {
            l.dropped(&saved, x)?.linear::<Tensor>(&w, None)
        } else {
            self.without_bias(&basef)
        };
        let y = &basef + (&g - 1.0) * plain + &g * branch;
        saved.dora = Some((g, norm));
        Ok((y.to_kind(x.kind()), saved))
    }

    /// DoRA's backward for the output gradient `dy` (module comment): accumulates the
    /// magnitude's and the branch's gradients, and returns the input gradient when `w` (the
    /// frozen weight in the matmul type) is given.
    fn dora_backward(
        &self,
        l: &LoraAdapter,
        saved: &LoraSaved,
        x: &Tensor,
        dy: &Tensor,
        w: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let _p = scope(Part::Lora);
        let (g, norm) = saved
            .dora
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("a DoRA layer's forward saved no DoRA factor"))?;
        let w32 = match w {
            Some(w) if w.kind() == Kind::Float => w.shallow_clone(),
            _ => self.dense_in(Kind::Float, &Scratch::default())?,
        };
        let dyf = dy.to_kind(Kind::Float);
        let dropped = LoraAdapter::dropped_out(saved);
        // The frozen product on the rows the branch saw, as the forward used it.
        let plain = if dropped {
            l.dropped(saved, x)?.linear::<Tensor>(&w32, None)
        } else {
            match w {
                Some(w) => linear_in(x, w, None).to_kind(Kind::Float),
                None => x.to_kind(Kind::Float).linear::<Tensor>(&w32, None),
            }
        };
        if let Some(m) = &l.magnitude {
            let dm = (&dyf * (plain + l.output(saved)) / norm).sum_dim_intlist(
                [0i64].as_slice(),
                false,
                Kind::Float,
            );
            crate::lora::accumulate_grad(m, &dm);
        }
        let gdy = &dyf * g;
        let branch_dx = l.backward(saved, x, &gdy)?;
        let Some(w) = w else { return Ok(None) };
        let dx = if dropped {
            let extra = (&dyf * (g - 1.0)).mm(&w32);
            mm_in(dy, w) + l.through_dropout(saved, &extra)?.to_kind(dy.kind())
        } else {
            mm_in(&gdy.to_kind(dy.kind()), w)
        };
        Ok(Some(dx + branch_dx))
    }

    /// The gradient of the input rows for the output gradient `dy` `[N, out]` (`dy · W`, as
    /// autograd computes it for `linear`), accumulating the LoRA gradients. `x` rebuilds the
    /// forward's input rows; it is called only when there is a LoRA branch.
    pub fn backward(
        &self,
        saved: Option<&LoraSaved>,
        x: impl FnOnce() -> Tensor,
        dy: &Tensor,
        scratch: &Scratch,
    ) -> Result<Tensor> {
        let w = self.dense_in(gemm_kind(dy.kind(), dy.device()), scratch)?;
        if let (Some(l), Some(s)) = (&self.lora, saved) {
            if l.magnitude.is_some() {
                let dx = self.dora_backward(l, s, &x(), dy, Some(&w))?;
                return dx.ok_or_else(|| anyhow::anyhow!("DoRA gave no input gradient"));
            }
        }
        let dx = {
            let _p = scope(Part::Matmul);
            mm_in(dy, &w)
        };
        drop(w);
        Ok(match (&self.lora, saved) {
            (Some(l), Some(s)) => {
                let _p = scope(Part::Lora);
                dx + l.backward(s, &x(), dy)?
            }
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
            if l.magnitude.is_some() {
                self.dora_backward(l, s, &x(), dy, None)?;
                return Ok(());
            }
            let _p = scope(Part::Lora);
            let _input_grad = l.backward(s, &x(), dy)?;
        }
        Ok(())
    }
}
