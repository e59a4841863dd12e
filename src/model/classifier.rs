//! `<Family>ForSequenceClassification` under PEFT: frozen (NF4 or dense) decoder, LoRA adapters,
//! and a trainable fp32 `score` head (PEFT's `modules_to_save`). Logits are read at the
//! rightmost token that is not `pad_token_id`, transformers' rule.
use crate::lora::LoraConfig;
use crate::model::backward::{LayerSaved, Rows};
use crate::model::checkpoint::{self, LoadOptions};
use crate::model::hf_config::{peft_param_counts_for, LlamaConfig};
use crate::model::llama::{LayerContext, LlamaModel};
use crate::model::loss::{self, LossWeights, ProblemType};
use crate::profile::{scope, Part};
use crate::quant::nf4::Nf4Options;
use crate::quant::qlinear::FrozenWeight;
use crate::splitmix::mix;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub device: Device,
    pub compute_dtype: Kind,
    pub quant: Option<Nf4Options>,
    pub lora: Option<LoraConfig>,
    pub num_labels: i64,
    pub pad_token_id: i64,
    /// Gradient checkpointing by layer: the first `recompute_layers` decoder layers keep
    /// only their input and are recomputed in the backward, the others keep their
    /// activations ([`RECOMPUTE_ALL`]: every layer, the reference's setting; 0: none).
    pub recompute_layers: usize,
    pub seed: u64,
    /// A trained PiSSA / LoftQ adapter's `residual_base.safetensors` (see `LoadOptions`).
    pub residual: Option<std::path::PathBuf>,
}

/// Where a batch sits in its global batch: the index of its first example there (LoRA
/// dropout masks are keyed by it) and its share of the global batch's mean loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchPart {
    pub first_example: i64,
    pub loss_weight: f64,
}

impl BatchPart {
    /// A batch that is its own global batch.
    pub const WHOLE: BatchPart = BatchPart {
        first_example: 0,
        loss_weight: 1.0,
    };
}

/// `recompute_layers` for recomputing every decoder layer, whatever the model's depth.
pub const RECOMPUTE_ALL: usize = usize::MAX;

/// What a decoder layer's forward leaves for its backward: its saved activations, or only its
/// input when the backward recomputes it. One per layer for one step, so the variants' sizes
/// do not matter.
#[allow(clippy::large_enum_variant)]
enum Kept {
    Saved(LayerSaved),
    Input(Tensor),
}

pub const SCORE_KEY: &str = "base_model.model.score.weight";

pub struct LlamaClassifier {
    pub config: LlamaConfig,
    pub model: LlamaModel,
    /// `[num_labels, hidden]`, fp32 leaf with requires_grad.
    pub score: Tensor,
    pub opts: ModelOptions,
    /// Counts training forwards, so each draws fresh dropout masks that a checkpointed
    /// recomputation can reproduce.
    dropout_step: AtomicU64,
    /// The training loss: problem type and class weights (cross-entropy unweighted unless set).
    loss_kind: (ProblemType, LossWeights),
    /// `Some(center_rewards_coefficient)`: the loss of preference pairs.
    pairs: Option<Option<f64>>,
    /// The temperature [`Self::logits`] divides by (an adapter's `calibration.json`; 1 in
    /// training). The training pass and [`Self::forward`] never use it.
    temperature: f64,
}

/// PEFT's name of layer `i`'s module `path` (`self_attn.q_proj`) in a saved adapter.
fn peft_module(i: usize, path: &str) -> String {
    format!("base_model.model.model.layers.{i}.{path}")
}

impl LlamaClassifier {
    /// Reads `model_dir/config.json` and the safetensors checkpoint, quantising linear weights
    /// as they are read; then draws LoRA A (Kaiming-uniform, a=√5), B (zeros) and the score
    /// head (N(0, initializer_range)) from the torch generator seeded with `opts.seed`.
    pub fn load(model_dir: &Path, opts: &ModelOptions) -> Result<Self> {
        if !matches!(
            opts.compute_dtype,
            Kind::Float | Kind::BFloat16 | Kind::Half
        ) {
            bail!(
                "compute dtype {:?} is not supported (float32, bfloat16, float16)",
                opts.compute_dtype
            );
        }
        if opts.num_labels < 1 {
            bail!("num_labels must be at least 1, got {}", opts.num_labels);
        }
        if let Some(l) = &opts.lora {
            l.validate()?;
        }
        let config = LlamaConfig::from_dir(model_dir)?;
        if let Some(l) = &opts.lora {
            let keys: Vec<String> = (0..config.num_hidden_layers)
                .flat_map(|i| {
                    config
                        .linear_modules()
                        .iter()
                        .map(move |(p, n)| format!("model.layers.{i}.{p}.{n}"))
                })
                .collect();
            l.check_patterns(&keys)?;
            for m in &l.target_modules {
                if config.linear_shape(m).is_none() {
                    let own: Vec<&str> = config.linear_modules().iter().map(|(_, n)| *n).collect();
                    bail!(
                        "LoRA target module {m:?} is not a projection of model_type {} ({}: {})",
                        config.switches.family.model_type(),
                        model_dir.join("config.json").display(),
                        own.join(", ")
                    );
                }
            }
        }
        // `pissa_niter_N` draws its test matrices while the weights are read.
        tch::manual_seed(opts.seed as i64);
        let weights = checkpoint::load_base(
            model_dir,
            &config,
            &LoadOptions {
                device: opts.device,
                compute_dtype: opts.compute_dtype,
                quant: opts.quant,
                num_labels: opts.num_labels,
                lora: opts.lora.clone(),
                residual: opts.residual.clone(),
            },
        )
        .with_context(|| format!("cannot load the model in {}", model_dir.display()))?;
        tch::manual_seed(opts.seed as i64);
        let from_file = weights.score.as_ref().map(|s| s.shallow_clone());
        let model = LlamaModel::new(&config, weights, opts.lora.as_ref(), opts.device)
            .with_context(|| format!("cannot assemble the model in {}", model_dir.display()))?;
        let score = match from_file {
            Some(s) => s,
            None => Tensor::empty(
                [opts.num_labels, config.hidden_size],
                (Kind::Float, Device::Cpu),
            )
            .normal_(0.0, config.initializer_range),
        };
        let score = score
            .to_kind(Kind::Float)
            .to_device(opts.device)
            .detach()
            .set_requires_grad(true);
        Ok(LlamaClassifier {
            config,
            model,
            score,
            opts: opts.clone(),
            dropout_step: AtomicU64::new(0),
            loss_kind: (ProblemType::SingleLabel, LossWeights::None),
            pairs: None,
            temperature: 1.0,
        })
    }

    /// Sets the step the next [`Self::forward_backward`]'s dropout masks derive from (each
    /// call then counts one step); the training loop names its step to
    /// [`Self::forward_backward_part`] instead.
    pub fn set_dropout_step(&self, step: u64) {
        self.dropout_step.store(step, Ordering::Relaxed);
    }

    /// Per-layer LoRA dropout seeds of optimizer step `step`; `None` when dropout is off. The
    /// masks of step s, layer l and projection p derive from (seed, s, l, p), so a
    /// checkpointed recomputation, another micro-batch of the step or a resumed run draws
    /// them again.
    fn dropout_seeds(&self, step: u64) -> Option<Vec<u64>> {
        if !self.opts.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
            return None;
        }
        let base = mix(self.opts.seed, step);
        Some(
            (0..self.model.layers.len() as u64)
                .map(|i| mix(base, i))
                .collect(),
        )
    }

    fn check_inputs(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<()> {
        let s = input_ids.size();
        if s.len() != 2 || attention_mask.size() != s {
            bail!(
                "input_ids {:?} and attention_mask {:?} must both be [batch, seq]",
                s,
                attention_mask.size()
            );
        }
        if s[0] == 0 || s[1] == 0 {
            bail!("empty batch {s:?}");
        }
        Ok(())
    }

    fn context(&self, attention_mask: &Tensor) -> LayerContext {
        LayerContext::new(
            &self.model.spec,
            &attention_mask.to_device(self.opts.device),
            self.opts.compute_dtype,
        )
    }

    /// The ids on the model's device and the batch's token rows. Given host tensors (as
    /// the training loop passes them), the rows are worked out on the host.
    fn rows(&self, input_ids: &Tensor, attention_mask: &Tensor) -> (Tensor, Rows) {
        let at = attention_mask.device();
        let ids_there = input_ids.to_device(at).to_kind(Kind::Int64);
        let rows = Rows::new(
            &self.model.spec,
            attention_mask,
            &self.last_non_pad(&ids_there),
            self.opts.compute_dtype,
            self.opts.device,
        );
        (ids_there.to_device(self.opts.device), rows)
    }

    /// transformers' pooling index: `argmax(arange(T) * (input_ids != pad))`.
    fn last_non_pad(&self, input_ids: &Tensor) -> Tensor {
        let t = input_ids.size()[1];
        let non_pad = input_ids.ne(self.opts.pad_token_id).to_kind(Kind::Int64);
        (Tensor::arange(t, (Kind::Int64, input_ids.device())) * non_pad).argmax(-1, false)
    }

    /// Pooling, final norm and the fp32 score head.
    fn head(&self, hidden: &Tensor, input_ids: &Tensor) -> Tensor {
        let s = hidden.size();
        let (b, t) = (s[0], s[1]);
        let rows =
            Tensor::arange(b, (Kind::Int64, hidden.device())) * t + self.last_non_pad(input_ids);
        self.score_rows(&hidden.reshape([b * t, s[2]]).index_select(0, &rows))
    }

    /// Final norm (per row, so it may follow the pooling) and the fp32 score head.
    fn score_rows(&self, pooled: &Tensor) -> Tensor {
        self.model
            .norm
            .forward(pooled)
            .to_kind(Kind::Float)
            .linear::<Tensor>(&self.score, None)
    }

    /// fp32 logits `[B, num_labels]` of the padded batch, op for op as transformers computes
    /// them (no dropout), with the autograd graph: the reference that the training pass
    /// ([`Self::forward_backward`]) and evaluation ([`Self::logits`]) are tested against.
    /// Under `tch::no_grad` unless a gradient is wanted, or the graph (and with NF4 weights,
    /// each layer's dequantised copies) lives until the logits are dropped.
    pub fn try_forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.check_inputs(input_ids, attention_mask)?;
        let ids = input_ids.to_device(self.opts.device).to_kind(Kind::Int64);
        let ctx = self.context(attention_mask);
        let mut h = self.model.embed(&ids);
        for (i, layer) in self.model.layers.iter().enumerate() {
            h = layer
                .forward(&h, &ctx)
                .with_context(|| format!("decoder layer {i}"))?;
        }
        Ok(self.head(&h, &ids))
    }

    /// Evaluation logits `[B, num_labels]` (fp32, no graph, no dropout), computed on the
    /// batch's real tokens only like the training pass; equal to [`Self::try_forward`]'s up to
    /// the matmuls' rounding, divided by the temperature when one is set.
    pub fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.check_inputs(input_ids, attention_mask)?;
        tch::no_grad(|| {
            let (ids, rows) = self.rows(input_ids, attention_mask);
            let mut h = rows.gather(&self.model.embed(&ids));
            let last = self.model.layers.len().saturating_sub(1);
            for (i, layer) in self.model.layers.iter().enumerate().take(last) {
                h = layer
                    .forward_rows(&h, &rows, None, false)
                    .with_context(|| format!("decoder layer {i}"))?
                    .0;
            }
            // The last layer works at the pooled rows alone: nothing reads its other outputs.
            let pooled = match self.model.layers.last() {
                Some(layer) => layer
                    .forward_pooled(&h, &rows)
                    .with_context(|| format!("decoder layer {last}"))?,
                None => h.index_select(0, &rows.pool),
            };
            let z = self.score_rows(&pooled);
            Ok(if self.temperature == 1.0 {
                z
            } else {
                z / self.temperature
            })
        })
    }

    /// As [`Self::try_forward`]; panics on malformed inputs.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        match self.try_forward(input_ids, attention_mask) {
            Ok(t) => t,
            Err(e) => panic!("LlamaClassifier::forward: {e:#}"),
        }
    }

    /// The loss `forward_backward` trains: transformers' for `problem` ([`loss::loss`]), with
    /// torch's `CrossEntropyLoss(weight=)` / `BCEWithLogitsLoss(pos_weight=)` when `weights`
    /// are given.
    pub fn set_loss(&mut self, problem: ProblemType, weights: Option<Vec<f64>>) {
        self.loss_kind = (
            problem,
            weights.map_or(LossWeights::None, LossWeights::PerClass),
        );
    }

    /// Temperature scaling for inference: [`Self::logits`] returns `z / t`.
    pub fn set_temperature(&mut self, t: f64) -> Result<()> {
        anyhow::ensure!(
            t.is_finite() && t > 0.0,
            "a temperature must be positive, got {t}"
        );
        self.temperature = t;
        Ok(())
    }

    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The class weights [`Self::set_loss`] set (evaluation reports the same loss).
    pub fn loss_weights(&self) -> &LossWeights {
        &self.loss_kind.1
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        match self.pairs {
            Some(center) => loss::pairwise_loss(logits, labels, center),
            None => loss::loss(logits, labels, self.loss_kind.0, &self.loss_kind.1),
        }
    }

    /// `Some(center_rewards_coefficient)` when training on preference pairs.
    pub fn pairwise(&self) -> Option<Option<f64>> {
        self.pairs
    }

    /// Trains on preference pairs ([`loss::pairwise_loss`], with TRL's
    /// `center_rewards_coefficient`): a batch's rows are its chosen texts then its rejected
    /// ones, and its labels the pairs' margins.
    pub fn set_pairwise_loss(&mut self, center_rewards_coefficient: Option<f64>) {
        self.pairs = Some(center_rewards_coefficient);
    }

    /// The task's mean loss ([`Self::set_loss`]) forward and backward of a whole batch,
    /// accumulating `.grad` of the
    /// trainable tensors: [`Self::forward_backward_part`] of a batch that is its own global
    /// batch. Returns (loss, detached logits).
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
    ) -> Result<(f64, Tensor)> {
        let step = self.dropout_step.fetch_add(1, Ordering::Relaxed);
        let (loss, logits) =
            self.forward_backward_part(input_ids, attention_mask, labels, &BatchPart::WHOLE, step)?;
        Ok((loss.double_value(&[]), logits))
    }

    /// Forward and backward of one part of a global batch (a rank's share, a micro-batch of
    /// gradient accumulation), on the batch's real tokens only ([`Rows`]) with the
    /// hand-written backward of [`crate::model::backward`]. The part's mean loss is
    /// scaled by `part.loss_weight` before the backward, so the parts' gradients add up to the
    /// global batch's mean; dropout masks are keyed by each example's place in the global
    /// batch, so they do not depend on how it was split. A layer that keeps its activations
    /// saves them in the forward; one of the first `opts.recompute_layers` saves only its
    /// input, and the backward recomputes it (drawing the same dropout masks), one layer at
    /// a time. `dropout_step` is the optimizer step the masks belong to. Returns (the part's
    /// unweighted mean loss as a detached scalar on the device, detached logits): reading it
    /// back is the caller's one sync per step.
    pub fn forward_backward_part(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
        part: &BatchPart,
        dropout_step: u64,
    ) -> Result<(Tensor, Tensor)> {
        self.check_inputs(input_ids, attention_mask)?;
        let per_label = if self.pairs.is_some() { 2 } else { 1 };
        if labels.size().first().map(|n| n * per_label) != Some(input_ids.size()[0]) {
            bail!(
                "labels {:?} must have one row per {} of input_ids {:?}",
                labels.size(),
                if per_label == 2 { "pair" } else { "example" },
                input_ids.size()
            );
        }
        let (ids, mut rows) = self.rows(input_ids, attention_mask);
        let seeds = self.dropout_seeds(dropout_step);
        if seeds.is_some() {
            rows.key_dropout(part.first_example, self.pairs.is_some())?;
        }
        let train_layers = self.opts.lora.is_some();
        let recompute = |i: usize| i < self.opts.recompute_layers;
        let mut h = {
            let _p = scope(Part::Elementwise);
            tch::no_grad(|| rows.gather(&self.model.embed(&ids)))
        };
        let mut kept = Vec::new();
        let seed = |i: usize| seeds.as_ref().map(|s| s[i]);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (next, s) = layer
                .forward_rows(&h, &rows, seed(i), train_layers && !recompute(i))
                .with_context(|| format!("decoder layer {i}"))?;
            if train_layers {
                kept.push(match s {
                    Some(s) => Kept::Saved(s),
                    None => Kept::Input(h),
                });
            }
            h = next;
        }
        let head = scope(Part::HeadLoss);
        let last = h.detach().set_requires_grad(true);
        let logits = self.score_rows(&last.index_select(0, &rows.pool));
        let loss = self.loss(&logits, labels)?;
        let loss_value = loss.detach();
        (loss * part.loss_weight)
            .f_backward()
            .context("backward pass (head)")?;
        drop(head);
        if !train_layers {
            return Ok((loss_value, logits.detach()));
        }
        let mut grad_out = last.grad();
        drop(last);
        for (i, layer) in self.model.layers.iter().enumerate().rev() {
            let s = match kept.pop() {
                Some(Kept::Saved(s)) => s,
                Some(Kept::Input(x)) => layer
                    .forward_rows(&x, &rows, seed(i), true)
                    .with_context(|| format!("recomputing decoder layer {i}"))?
                    .1
                    .context("a recomputed layer saves its forward")?,
                None => bail!("decoder layer {i} kept nothing for its backward"),
            };
            // The embeddings are frozen: layer 0's input needs no gradient.
            if let Some(g) = layer
                .backward(s, &rows, &grad_out, i > 0)
                .with_context(|| format!("backward pass (layer {i})"))?
            {
                grad_out = g;
            }
        }
        Ok((loss_value, logits.detach()))
    }

    /// Trainable tensors under PEFT's adapter names (`get_peft_model_state_dict`), sharing
    /// storage and `.grad` with the model.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (path, a) in layer.adapters() {
                let p = peft_module(i, &path);
                out.push((format!("{p}.lora_A.weight"), a.a.shallow_clone()));
                out.push((format!("{p}.lora_B.weight"), a.b.shallow_clone()));
                if let Some(m) = &a.magnitude {
                    out.push((format!("{p}.lora_magnitude_vector"), m.shallow_clone()));
                }
            }
        }
        out.push((SCORE_KEY.to_string(), self.score.shallow_clone()));
        out
    }

    /// The frozen weights a PiSSA / LoftQ adapter was trained against (`residual_base.
    /// safetensors`: the adapted modules under their checkpoint names, NF4 in bitsandbytes'
    /// layout); empty for an init that leaves the base as it is.
    pub fn residual_base(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        if !self
            .opts
            .lora
            .as_ref()
            .is_some_and(|l| l.init.changes_base())
        {
            return Ok(out);
        }
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (path, q) in layer.linears() {
                if q.lora.is_none() {
                    continue;
                }
                let prefix = format!("model.layers.{i}.{path}.");
                match &q.weight {
                    FrozenWeight::Nf4(t) => out.extend(t.to_bnb_tensors(&prefix)?),
                    FrozenWeight::Dense(w) => {
                        out.push((format!("{prefix}weight"), w.shallow_clone()))
                    }
                }
            }
        }
        Ok(out)
    }

    /// PiSSA's starting pairs under PEFT's names (`…lora_A.weight` → A₀, `…lora_B.weight`
    /// → B₀), for [`crate::lora`]'s conversion to a plain LoRA; empty for other inits.
    pub fn initial_pairs(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (path, a) in layer.adapters() {
                if let Some((a0, b0)) = &a.initial {
                    let p = peft_module(i, &path);
                    out.push((format!("{p}.lora_A.weight"), a0.shallow_clone()));
                    out.push((format!("{p}.lora_B.weight"), b0.shallow_clone()));
                }
            }
        }
        out
    }

    /// Copies values from a PEFT adapter (`adapter_model.safetensors`) into the trainable
    /// tensors; every expected key must be present with the right shape.
    pub fn load_trainable(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        let params = self.trainable_parameters();
        let mut missing = Vec::new();
        let mut found = Vec::with_capacity(params.len());
        for (name, p) in params {
            match get(&name) {
                None => missing.push(name),
                Some(v) => {
                    if v.size() != p.size() {
                        bail!(
                            "adapter tensor {name} has shape {:?}, expected {:?}",
                            v.size(),
                            p.size()
                        );
                    }
                    found.push((p, v));
                }
            }
        }
        if !missing.is_empty() {
            bail!(
                "adapter lacks {} tensor(s): {}",
                missing.len(),
                missing.join(", ")
            );
        }
        tch::no_grad(|| {
            for (mut p, v) in found {
                p.copy_(&v.to_device(p.device()).to_kind(p.kind()));
            }
        });
        Ok(())
    }

    /// PEFT-style (trainable, all) counts, as `peft_param_counts`.
    /// Bytes the frozen NF4 weights would take dequantised to the compute dtype.
    pub fn dense_frozen_bytes(&self) -> u64 {
        let kind = self.opts.compute_dtype;
        self.model
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|(_, l)| l.dense_bytes(kind))
            .sum()
    }

    /// For inference only (the model cannot train afterwards): dequantises every frozen NF4
    /// weight once, to the compute dtype, and in fp32 folds each LoRA pair into its weight
    /// ([`crate::quant::qlinear::QLinear::densify`]); the logits move by float rounding only.
    pub fn densify_frozen(&mut self) -> Result<()> {
        let kind = self.opts.compute_dtype;
        for layer in &mut self.model.layers {
            for l in layer.linears_mut() {
                l.densify(kind)?;
            }
        }
        Ok(())
    }

    pub fn param_counts(&self) -> (u64, u64) {
        match &self.opts.lora {
            Some(l) => peft_param_counts_for(&self.config, self.opts.num_labels, l),
            None => {
                let score = (self.opts.num_labels * self.config.hidden_size) as u64;
                (score, self.config.base_param_count() + score)
            }
        }
    }
}
