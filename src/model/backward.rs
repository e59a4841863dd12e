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
use crate::dropout::{MaskKey, MAX_POSITIONS};
use crate::lora::LoraSaved;
use crate::model::llama::{rotate_half, ContextSpec, DecoderLayer, LayerContext, RmsNorm};
use crate::profile::{scope, Part};
use crate::quant::qlinear::Scratch;
use crate::splitmix::mix;
use anyhow::{Context, Result};
use std::cell::OnceCell;
use tch::{Device, Kind, Tensor};

/// One batch's token rows and how they map to the padded layout.
pub struct Rows {
    pub batch: i64,
    pub seq: i64,
    /// `[N]` positions in the flattened `[B·T]` layout, ascending; `None` when every
    /// position is a row (nothing is padded).
    pub index: Option<Tensor>,
    /// Per rotary table, `[N, head_dim]` cos and sin at each row's position, in the
    /// compute dtype.
    pub ropes: Vec<(Tensor, Tensor)>,
    /// The padded attention's masks (see [`LayerContext`]).
    pub ctx: LayerContext,
    /// `[B]` the row of each sequence's pooled token.
    pub pool: Tensor,
    /// `[N]` each row's LoRA dropout key ([`crate::dropout::row_key`]), once [`Self::key_dropout`] set them.
    pub dropout_keys: Option<Tensor>,
    /// The buffer every frozen weight of this batch's passes is dequantised into.
    pub scratch: Scratch,
}

impl Rows {
    /// `pooled`: `[B]` the position (in `0..T`) each sequence is read out at. The mask and
    /// `pooled` may sit on the host while the model runs on `device`: the row bookkeeping
    /// (which positions are real, how many) is then done there, and the forward never waits
    /// for the device to tell the host a row count.
    pub fn new(
        spec: &ContextSpec,
        attention_mask: &Tensor,
        pooled: &Tensor,
        kind: Kind,
        device: Device,
    ) -> Self {
        let host = attention_mask.device();
        let s = attention_mask.size();
        let (b, t) = (s[0], s[1]);
        let ctx = LayerContext::new(spec, &attention_mask.to_device(device), kind);
        let flat_pooled = Tensor::arange(b, (Kind::Int64, host)) * t + pooled.to_device(host);
        let keep = attention_mask
            .to_kind(Kind::Bool)
            .reshape([-1])
            .index_fill(0, &flat_pooled, 1);
        let flat_pooled = flat_pooled.to_device(device);
        if keep.all().int64_value(&[]) != 0 {
            return Rows {
                batch: b,
                seq: t,
                index: None,
                ropes: ctx
                    .ropes
                    .iter()
                    .map(|(c, s)| (c.repeat([b, 1]), s.repeat([b, 1])))
                    .collect(),
                ctx,
                pool: flat_pooled,
                dropout_keys: None,
                scratch: Scratch::default(),
            };
        }
        let index = keep.nonzero().reshape([-1]).to_device(device);
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
            ropes: ctx
                .ropes
                .iter()
                .map(|(c, s)| (c.index_select(0, &pos), s.index_select(0, &pos)))
                .collect(),
            pool: row_of.index_select(0, &flat_pooled),
            index: Some(index),
            ctx,
            dropout_keys: None,
            scratch: Scratch::default(),
        }
    }

    /// Keys each row's LoRA dropout masks by its example's index in the global batch (this
    /// batch's first example is `first_example` there) and its position in the sequence.
    pub fn key_dropout(&mut self, first_example: i64, pairs: bool) -> Result<()> {
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
        let row = flat.divide_scalar_mode(self.seq, "floor");
        // Pairs: rows are the chosen texts then the rejected ones, and `first_example` counts
        // pairs; pair p's texts are examples 2p and 2p + 1 however the batch was split.
        let example = if pairs {
            let half = self.batch / 2;
            (row.remainder(half) + first_example) * 2 + row.divide_scalar_mode(half, "floor")
        } else {
            row + first_example
        };
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

    /// Rotary embedding (table `which`) of `[N, heads·d]` rows, element for element as the
    /// padded layout's.
    fn rope(&self, x: &Tensor, d: i64, which: usize) -> Tensor {
        let n = x.size()[0];
        let (cos, sin) = &self.ropes[which];
        let x = x.view([n, -1, d]);
        let cos = cos.view([n, 1, d]);
        let sin = sin.view([n, 1, d]);
        (&x * &cos + rotate_half(&x) * &sin).view([n, -1])
    }

    /// The transpose of [`Self::rope`]: `g·cos + rotate_halfᵀ(g·sin)`.
    fn rope_backward(&self, g: &Tensor, d: i64, which: usize) -> Tensor {
        let n = g.size()[0];
        let (cos, sin) = &self.ropes[which];
        let g = g.view([n, -1, d]);
        let gs = &g * sin.view([n, 1, d]);
        let half = d / 2;
        let rt = Tensor::cat(
            &[gs.narrow(-1, half, d - half), gs.narrow(-1, 0, half).neg()],
            -1,
        );
        (&g * cos.view([n, 1, d]) + rt).view([n, -1])
    }
}

/// The q, k and v parts of the attention's projections, in that order.
fn split_qkv(parts: Vec<Tensor>) -> (Tensor, Tensor, Tensor) {
    let mut parts = parts.into_iter();
    (
        parts.next().expect("q"),
        parts.next().expect("k"),
        parts.next().expect("v"),
    )
}

/// A norm's input and its `rstd`, for the backward.
struct NormSaved {
    x: Tensor,
    rstd: Tensor,
}

/// `norm(x)` on rows, saving what its backward needs when there is a norm; `x` otherwise.
fn norm_rows(norm: &Option<RmsNorm>, x: Tensor, d: Option<i64>) -> (Tensor, Option<NormSaved>) {
    match norm {
        None => (x, None),
        Some(n) => {
            let shaped = match d {
                Some(d) => x.view([x.size()[0], -1, d]),
                None => x.shallow_clone(),
            };
            let (y, rstd) = n.forward_saved(&shaped);
            let y = y.view(x.size().as_slice());
            (y, Some(NormSaved { x: shaped, rstd }))
        }
    }
}

/// The gradient through [`norm_rows`].
fn norm_rows_backward(norm: &Option<RmsNorm>, saved: &Option<NormSaved>, dy: Tensor) -> Tensor {
    match (norm, saved) {
        (Some(n), Some(s)) => {
            let shape = dy.size();
            n.backward(&s.x, &s.rstd, &dy.view(s.x.size().as_slice()), dy.kind())
                .view(shape.as_slice())
        }
        _ => dy,
    }
}

/// One decoder layer's activations for its backward: its input, the attention's inputs,
/// the residual stream between the two blocks and the MLP's two projections (plus, where
/// the family has them, the inputs of the q/k norms and of the post-norms). Everything else
/// (the normed inputs, the attention itself, `act(g)·u`) is recomputed from these.
pub struct LayerSaved {
    x: Tensor,
    rstd1: Tensor,
    /// Rotated queries and keys and the values, `[N, heads·d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_norm: Option<NormSaved>,
    k_norm: Option<NormSaved>,
    attn_post: Option<NormSaved>,
    h: Tensor,
    rstd2: Tensor,
    gate_out: Tensor,
    up_out: Tensor,
    mlp_post: Option<NormSaved>,
    qkv_lora: Vec<Option<LoraSaved>>,
    o_lora: Option<LoraSaved>,
    gate_up_lora: Vec<Option<LoraSaved>>,
    down_lora: Option<LoraSaved>,
}

impl DecoderLayer {
    /// The layer's output at the pooled rows only, `[B, hidden]`, for inference: every row's
    /// keys and values are needed, but the queries, attention, `o_proj`, the MLP and the
    /// norms only where the classifier reads (a last layer's other outputs are never used).
    pub fn forward_pooled(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let _p = scope(Part::Elementwise);
        tch::no_grad(|| {
            let a = &self.self_attn;
            let d = a.head_dim;
            let b = rows.batch;
            let (n1, _) = self.attn_norm.forward_saved(x);
            let no_key = |_: u64| None;
            let (parts, _) = a.qkv.forward_saved(&n1, &no_key, &rows.scratch)?;
            drop(n1);
            let (q, k, v) = split_qkv(parts);
            let (q, _) = norm_rows(&a.q_norm, q, Some(d));
            let (k, _) = norm_rows(&a.k_norm, k, Some(d));
            let q = rows.rope(&q, d, a.rope).index_select(0, &rows.pool);
            let k = rows.rope(&k, d, a.rope);
            let qh = q.view([b, -1, 1, d]);
            let (kh, vh) = (rows.heads_of_rows(&k, d), rows.heads_of_rows(&v, d));
            let flat = match &rows.index {
                Some(ix) => ix.index_select(0, &rows.pool),
                None => rows.pool.shallow_clone(),
            };
            let pos = flat.remainder(rows.seq);
            let attn = {
                let _p = scope(Part::Attention);
                a.attend_at(&qh, &kh, &vh, &rows.ctx, &pos)
            };
            drop((qh, kh, vh));
            let (o, _) = a
                .o_proj
                .forward_saved(&attn.view([b, -1]), None, &rows.scratch)?;
            let (o, _) = norm_rows(&self.attn_post_norm, o, None);
            let h = x.index_select(0, &rows.pool) + o;
            let m = &self.mlp;
            let (n2, _) = self.mlp_norm.forward_saved(&h);
            let (parts, _) = m.gate_up.forward_saved(&n2, &no_key, &rows.scratch)?;
            let mut parts = parts.into_iter();
            let (g, u) = (parts.next().expect("gate"), parts.next().expect("up"));
            let (dn, _) =
                m.down_proj
                    .forward_saved(&(m.act.forward(&g) * &u), None, &rows.scratch)?;
            let (dn, _) = norm_rows(&self.mlp_post_norm, dn, None);
            Ok(&h + dn)
        })
    }

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
        let _p = scope(Part::Elementwise);
        tch::no_grad(|| {
            let a = &self.self_attn;
            let d = a.head_dim;
            let (n1, rstd1) = self.attn_norm.forward_saved(x);
            let (parts, qkv_lora) = a.qkv.forward_saved(&n1, &seed, &rows.scratch)?;
            drop(n1);
            let (q, k, v) = split_qkv(parts);
            let (q, q_norm) = norm_rows(&a.q_norm, q, Some(d));
            let (k, k_norm) = norm_rows(&a.k_norm, k, Some(d));
            let q = rows.rope(&q, d, a.rope);
            let k = rows.rope(&k, d, a.rope);
            let (qh, kh, vh) = (
                rows.heads_of_rows(&q, d),
                rows.heads_of_rows(&k, d),
                rows.heads_of_rows(&v, d),
            );
            let attn = {
                let _p = scope(Part::Attention);
                a.attend(&qh, &kh, &vh, &rows.ctx)
            };
            drop((qh, kh, vh));
            let (o, o_lora) =
                a.o_proj
                    .forward_saved(&rows.rows_of_heads(&attn), seed(3), &rows.scratch)?;
            drop(attn);
            let (o, attn_post) = norm_rows(&self.attn_post_norm, o, None);
            let h = x + o;
            let m = &self.mlp;
            let (n2, rstd2) = self.mlp_norm.forward_saved(&h);
            let (parts, gate_up_lora) = m.gate_up.forward_saved(&n2, &seed, &rows.scratch)?;
            drop(n2);
            let mut parts = parts.into_iter();
            let (g, u) = (parts.next().expect("gate"), parts.next().expect("up"));
            let (dn, down_lora) =
                m.down_proj
                    .forward_saved(&(m.act.forward(&g) * &u), seed(6), &rows.scratch)?;
            let (dn, mlp_post) = norm_rows(&self.mlp_post_norm, dn, None);
            let out = &h + dn;
            let saved = save.then(|| LayerSaved {
                x: x.shallow_clone(),
                rstd1,
                q,
                k,
                v,
                q_norm,
                k_norm,
                attn_post,
                h,
                rstd2,
                gate_out: g,
                up_out: u,
                mlp_post,
                qkv_lora,
                o_lora,
                gate_up_lora,
                down_lora,
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
        let _p = scope(Part::Elementwise);
        let kind = dout.kind();
        let m = &self.mlp;
        let a = &self.self_attn;
        let d = a.head_dim;
        // MLP: out = h + post(down(act(g) · u))
        let dh = tch::no_grad(|| -> Result<Tensor> {
            let ddown = norm_rows_backward(&self.mlp_post_norm, &s.mlp_post, dout.shallow_clone());
            let sg = m.act.forward(&s.gate_out);
            let dact = m.down_proj.backward(
                s.down_lora.as_ref(),
                || &sg * &s.up_out,
                &ddown,
                &rows.scratch,
            )?;
            drop(ddown);
            let dgate_act = &dact * &s.up_out;
            let du = &dact * &sg;
            drop((dact, sg));
            let dg = m.act.backward(&s.gate_out, &dgate_act);
            // The normed input, rebuilt at most once for the LoRA branches that need it.
            let n2_cell = OnceCell::new();
            let n2 = || {
                n2_cell
                    .get_or_init(|| self.mlp_norm.normed(&s.h, &s.rstd2))
                    .shallow_clone()
            };
            let dn2 = m
                .gate_up
                .backward(&s.gate_up_lora, &n2, &[dg, du], &rows.scratch)?;
            Ok(dout + self.mlp_norm.backward(&s.h, &s.rstd2, &dn2, kind))
        })?;
        // Attention: h = x + post(o_proj(attn(rope(q), rope(k), v))), recomputed under autograd.
        let leaf = |t: &Tensor| rows.heads_of_rows(t, d).detach().set_requires_grad(true);
        let (qh, kh, vh) = (leaf(&s.q), leaf(&s.k), leaf(&s.v));
        let attn = {
            let _p = scope(Part::Attention);
            tch::with_grad(|| a.attend(&qh, &kh, &vh, &rows.ctx))
        };
        let dattn = tch::no_grad(|| {
            let do_ = norm_rows_backward(&self.attn_post_norm, &s.attn_post, dh.shallow_clone());
            a.o_proj.backward(
                s.o_lora.as_ref(),
                || rows.rows_of_heads(&attn.detach()),
                &do_,
                &rows.scratch,
            )
        })?;
        let dattn_heads = rows.heads_of_rows(&dattn, d);
        {
            let _p = scope(Part::Attention);
            tch::with_grad(|| (&attn * dattn_heads).sum(Kind::Float).f_backward())
                .context("attention backward")?;
        }
        drop((attn, dattn));
        let grad_rows = |leaf: &Tensor| -> Tensor {
            let g = leaf.grad();
            rows.rows_of_heads(&if g.defined() { g } else { leaf.zeros_like() })
        };
        tch::no_grad(|| {
            let dq = rows.rope_backward(&grad_rows(&qh), d, a.rope);
            let dk = rows.rope_backward(&grad_rows(&kh), d, a.rope);
            let dq = norm_rows_backward(&a.q_norm, &s.q_norm, dq);
            let dk = norm_rows_backward(&a.k_norm, &s.k_norm, dk);
            let dv = grad_rows(&vh);
            let n1_cell = OnceCell::new();
            let n1 = || {
                n1_cell
                    .get_or_init(|| self.attn_norm.normed(&s.x, &s.rstd1))
                    .shallow_clone()
            };
            let dparts = [dq, dk, dv];
            if !need_dx {
                a.qkv.backward_params_only(&s.qkv_lora, &n1, &dparts)?;
                return Ok(None);
            }
            let dn1 = a.qkv.backward(&s.qkv_lora, &n1, &dparts, &rows.scratch)?;
            Ok(Some(
                dh + self.attn_norm.backward(&s.x, &s.rstd1, &dn1, kind),
            ))
        })
    }
}
