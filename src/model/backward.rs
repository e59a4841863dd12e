//! The training pass of the decoder stack without autograd for the frozen model: each layer's
//! forward keeps exactly the activations its hand-written backward needs, and the backward
//! dequantises each frozen weight again for `dy · W` instead of keeping a dequantised copy
//! alive (what bitsandbytes' `MatMul4Bit` does). Only scaled-dot-product attention runs
//! under autograd: the backward recomputes it from the saved queries, keys and values as a
//! small graph of its own (cheap next to the projections, and it saves its output).
//!
//! Rows are the batch's real tokens only (`attention_mask` = 1, plus each sequence's pooled
//! token): every projection, norm and MLP runs on `[N, hidden]` with N the token count, not
//! `batch × longest`. Attention alone scatters them back to the padded `[B, heads, T, d]`
//! layout, where padded keys are masked as before. A padded position never influences a real
//! one, so the real rows equal those of the padded computation.
use crate::dropout::{mix, MaskKey, MAX_POSITIONS};
use crate::lora::LoraSaved;
use crate::model::llama::{rotate_half, DecoderLayer, LayerContext};
use anyhow::{Context, Result};
use std::cell::OnceCell;
use tch::{Kind, Tensor};

/// One batch's token rows and how they map to the padded layout.
pub struct Rows {
    pub batch: i64,
    pub seq: i64,
    /// `[N]` positions in the flattened `[B·T]` layout, ascending; `None` when every
    /// position is a row (nothing is padded).
    pub index: Option<Tensor>,
    /// `[N, head_dim]` rotary tables at each row's position, in the compute dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// The padded attention's mask (see [`LayerContext`]).
    pub ctx: LayerContext,
    /// `[B]` the row of each sequence's pooled token.
    pub pool: Tensor,
    /// `[N]` each row's LoRA dropout key ([`crate::dropout::row_key`]), once [`Self::key_dropout`] set them.
    pub dropout_keys: Option<Tensor>,
}

impl Rows {
    /// `pooled`: `[B]` the position (in `0..T`) each sequence is read out at.
    pub fn new(inv_freq: &Tensor, attention_mask: &Tensor, pooled: &Tensor, kind: Kind) -> Self {
        let device = attention_mask.device();
        let s = attention_mask.size();
        let (b, t) = (s[0], s[1]);
        let ctx = LayerContext::new(inv_freq, attention_mask, kind);
        let flat_pooled = Tensor::arange(b, (Kind::Int64, device)) * t + pooled;
        let keep = attention_mask
            .to_kind(Kind::Bool)
            .reshape([-1])
            .index_fill(0, &flat_pooled, 1);
        if keep.all().int64_value(&[]) != 0 {
            return Rows {
                batch: b,
                seq: t,
                index: None,
                cos: ctx.cos.repeat([b, 1]),
                sin: ctx.sin.repeat([b, 1]),
                ctx,
                pool: flat_pooled,
                dropout_keys: None,
            };
        }
        let index = keep.nonzero().reshape([-1]);
        let n = index.size()[0];
        let pos = index.remainder(t);
        let row_of = Tensor::full([b * t], -1, (Kind::Int64, device)).index_copy(
            0,
            &index,
            &Tensor::arange(n, (Kind::Int64, device)),
        );
        Rows {
            batch: b,
            seq: t,
            cos: ctx.cos.index_select(0, &pos),
            sin: ctx.sin.index_select(0, &pos),
            pool: row_of.index_select(0, &flat_pooled),
            index: Some(index),
            ctx,
            dropout_keys: None,
        }
    }

    /// Keys each row's LoRA dropout masks by its example's index in the global batch (this
    /// batch's first example is `first_example` there) and its position in the sequence.
    pub fn key_dropout(&mut self, first_example: i64) -> Result<()> {
        anyhow::ensure!(
            self.seq <= MAX_POSITIONS,
            "sequences of {} tokens are longer than LoRA dropout can key ({MAX_POSITIONS})",
            self.seq
        );
        let device = self.pool.device();
        let flat = match &self.index {
            Some(ix) => ix.shallow_clone(),
            None => Tensor::arange(self.batch * self.seq, (Kind::Int64, device)),
        };
        let example = flat.divide_scalar_mode(self.seq, "floor") + first_example;
        let position = flat.remainder(self.seq);
        self.dropout_keys = Some(example * MAX_POSITIONS + position);
        Ok(())
    }

    /// `[B, T, …]` values → `[N, …]` rows.
    pub fn gather(&self, padded: &Tensor) -> Tensor {
        let s = padded.size();
        let flat = padded.reshape([s[0] * s[1], -1]);
        match &self.index {
            Some(ix) => flat.index_select(0, ix),
            None => flat,
        }
    }

    /// `[N, w]` rows → `[B, T, w]` with zeros at the padded positions.
    fn scatter(&self, rows: &Tensor) -> Tensor {
        let w = rows.size()[1];
        let flat = match &self.index {
            Some(ix) => rows
                .new_zeros([self.batch * self.seq, w], (rows.kind(), rows.device()))
                .index_copy(0, ix, rows),
            None => rows.shallow_clone(),
        };
        flat.view([self.batch, self.seq, w])
    }

    /// `[N, heads·d]` rows → `[B, heads, T, d]`.
    fn heads_of_rows(&self, rows: &Tensor, d: i64) -> Tensor {
        self.scatter(rows)
            .view([self.batch, self.seq, -1, d])
            .transpose(1, 2)
    }

    /// `[B, heads, T, d]` → `[N, heads·d]` rows.
    fn rows_of_heads(&self, heads: &Tensor) -> Tensor {
        let o = heads
            .transpose(1, 2)
            .contiguous()
            .view([self.batch * self.seq, -1]);
        match &self.index {
            Some(ix) => o.index_select(0, ix),
            None => o,
        }
    }

    /// Rotary embedding of `[N, heads·d]` rows, element for element as the padded layout's.
    fn rope(&self, x: &Tensor, d: i64) -> Tensor {
        let n = x.size()[0];
        let x = x.view([n, -1, d]);
        let cos = self.cos.view([n, 1, d]);
        let sin = self.sin.view([n, 1, d]);
        (&x * &cos + rotate_half(&x) * &sin).view([n, -1])
    }

    /// The transpose of [`Self::rope`]: `g·cos + rotate_halfᵀ(g·sin)`.
    fn rope_backward(&self, g: &Tensor, d: i64) -> Tensor {
        let n = g.size()[0];
        let g = g.view([n, -1, d]);
        let gs = &g * self.sin.view([n, 1, d]);
        let half = d / 2;
        let rt = Tensor::cat(
            &[gs.narrow(-1, half, d - half), gs.narrow(-1, 0, half).neg()],
            -1,
        );
        (&g * self.cos.view([n, 1, d]) + rt).view([n, -1])
    }
}

/// One decoder layer's activations for its backward: its input, the attention's inputs,
/// the residual stream between the two blocks and the MLP's two projections. Everything else
/// (the normed inputs, the attention itself, `silu(g)·u`) is recomputed from these.
pub struct LayerSaved {
    x: Tensor,
    rstd1: Tensor,
    /// Rotated queries and keys and the values, `[N, heads·d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    h: Tensor,
    rstd2: Tensor,
    gate_out: Tensor,
    up_out: Tensor,
    lora: [Option<LoraSaved>; 7],
}

impl DecoderLayer {
    /// The layer on rows `x` `[N, hidden]` outside autograd (`dropout_seed`: `None` for
    /// evaluation); with `save`, also what [`Self::backward`] needs.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rows: &Rows,
        dropout_seed: Option<u64>,
        save: bool,
    ) -> Result<(Tensor, Option<LayerSaved>)> {
        // Each projection's LoRA dropout draws its own mask, keyed by the rows' tokens.
        let seed = |i: u64| {
            dropout_seed.map(|s| MaskKey {
                seed: mix(s, i),
                rows: rows.dropout_keys.as_ref().map(Tensor::shallow_clone),
            })
        };
        tch::no_grad(|| {
            let a = &self.self_attn;
            let d = a.head_dim;
            let (n1, rstd1) = self.input_layernorm.forward_saved(x);
            let (q, lq) = a.q_proj.forward_saved(&n1, seed(0))?;
            let (k, lk) = a.k_proj.forward_saved(&n1, seed(1))?;
            let (v, lv) = a.v_proj.forward_saved(&n1, seed(2))?;
            drop(n1);
            let q = rows.rope(&q, d);
            let k = rows.rope(&k, d);
            let attn = a.attend(
                &rows.heads_of_rows(&q, d),
                &rows.heads_of_rows(&k, d),
                &rows.heads_of_rows(&v, d),
                &rows.ctx,
            );
            let (o, lo) = a
                .o_proj
                .forward_saved(&rows.rows_of_heads(&attn), seed(3))?;
            drop(attn);
            let h = x + o;
            let m = &self.mlp;
            let (n2, rstd2) = self.post_attention_layernorm.forward_saved(&h);
            let (g, lg) = m.gate_proj.forward_saved(&n2, seed(4))?;
            let (u, lu) = m.up_proj.forward_saved(&n2, seed(5))?;
            drop(n2);
            let (dn, ld) = m.down_proj.forward_saved(&(g.silu() * &u), seed(6))?;
            let out = &h + dn;
            let saved = save.then(|| LayerSaved {
                x: x.shallow_clone(),
                rstd1,
                q,
                k,
                v,
                h,
                rstd2,
                gate_out: g,
                up_out: u,
                lora: [lq, lk, lv, lo, lg, lu, ld],
            });
            Ok((out, saved))
        })
    }

    /// Accumulates this layer's LoRA gradients for the output gradient `dout` `[N, hidden]`
    /// and returns the input's gradient when `need_dx`.
    pub fn backward(
        &self,
        s: LayerSaved,
        rows: &Rows,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let kind = dout.kind();
        let m = &self.mlp;
        let a = &self.self_attn;
        let d = a.head_dim;
        let [lq, lk, lv, lo, lg, lu, ld] = &s.lora;
        // MLP: out = h + down(silu(g) · u)
        let dh = tch::no_grad(|| -> Result<Tensor> {
            let sg = s.gate_out.silu();
            let dact = m
                .down_proj
                .backward(ld.as_ref(), || &sg * &s.up_out, dout)?;
            let dsilu = &dact * &s.up_out;
            let du = &dact * &sg;
            drop((dact, sg));
            let dg = s.gate_out.silu_backward(&dsilu);
            // The normed input, rebuilt at most once for the LoRA branches that need it.
            let n2_cell = OnceCell::new();
            let n2 = || {
                n2_cell
                    .get_or_init(|| self.post_attention_layernorm.normed(&s.h, &s.rstd2))
                    .shallow_clone()
            };
            let dn2 = m.gate_proj.backward(lg.as_ref(), n2, &dg)?
                + m.up_proj.backward(lu.as_ref(), n2, &du)?;
            Ok(dout
                + self
                    .post_attention_layernorm
                    .backward(&s.h, &s.rstd2, &dn2, kind))
        })?;
        // Attention: h = x + o_proj(attn(rope(q), rope(k), v)), recomputed under autograd.
        let leaf = |t: &Tensor| rows.heads_of_rows(t, d).detach().set_requires_grad(true);
        let (qh, kh, vh) = (leaf(&s.q), leaf(&s.k), leaf(&s.v));
        let attn = tch::with_grad(|| a.attend(&qh, &kh, &vh, &rows.ctx));
        let dattn = tch::no_grad(|| {
            a.o_proj
                .backward(lo.as_ref(), || rows.rows_of_heads(&attn.detach()), &dh)
        })?;
        tch::with_grad(|| {
            (&attn * rows.heads_of_rows(&dattn, d))
                .sum(Kind::Float)
                .f_backward()
        })
        .context("attention backward")?;
        drop((attn, dattn));
        let grad_rows = |leaf: &Tensor| -> Tensor {
            let g = leaf.grad();
            rows.rows_of_heads(&if g.defined() { g } else { leaf.zeros_like() })
        };
        tch::no_grad(|| {
            let dq = rows.rope_backward(&grad_rows(&qh), d);
            let dk = rows.rope_backward(&grad_rows(&kh), d);
            let dv = grad_rows(&vh);
            let n1_cell = OnceCell::new();
            let n1 = || {
                n1_cell
                    .get_or_init(|| self.input_layernorm.normed(&s.x, &s.rstd1))
                    .shallow_clone()
            };
            if !need_dx {
                a.q_proj.backward_params_only(lq.as_ref(), n1, &dq)?;
                a.k_proj.backward_params_only(lk.as_ref(), n1, &dk)?;
                a.v_proj.backward_params_only(lv.as_ref(), n1, &dv)?;
                return Ok(None);
            }
            let dn1 = a.q_proj.backward(lq.as_ref(), n1, &dq)?
                + a.k_proj.backward(lk.as_ref(), n1, &dk)?
                + a.v_proj.backward(lv.as_ref(), n1, &dv)?;
            Ok(Some(
                dh + self.input_layernorm.backward(&s.x, &s.rstd1, &dn1, kind),
            ))
        })
    }
}
