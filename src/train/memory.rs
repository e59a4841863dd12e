//! `gradient_checkpointing: auto`: keep every layer's activations (nothing recomputed but
//! the cheap elementwise ops, norms and attention; see `model::backward`) when the
//! estimated peak fits the memory budget; otherwise recompute as few layers in the backward
//! as make it fit (the first ones; each recomputed layer keeps only its input), which trades
//! memory for time one layer at a time instead of all at once. Checkpointing is what made the
//! reference fit a GPU; where memory is plentiful it only costs a third more matmul work, so
//! the default spends the memory QLoRA saved on speed.
//!
//! The peak is estimated from the shapes: what the process holds once the model is loaded
//! (resident memory on a CPU, the device's used memory on a GPU, both as measured), plus the
//! trainable tensors' gradients and optimizer state, plus the activations the backward
//! keeps for the largest batch the data can form, plus the largest transient of one layer's
//! backward (a dequantised weight, the MLP's gradients, attention's padded tensors).
use crate::config::{Checkpointing, Config};
use crate::data::batch::Encoded;
use crate::hardware::device_memory;
use crate::model::hf_config::LlamaConfig;
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// The decision and the figures behind it (logged, and kept in summary.json).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryPlan {
    /// Decoder layers recomputed in the backward (the first ones; the rest keep their
    /// activations), and the model's number of decoder layers.
    pub recompute_layers: usize,
    pub layers: usize,
    /// Whether any layer is recomputed.
    pub recompute: bool,
    /// Whether the configuration left the choice to the estimate.
    pub auto: bool,
    /// Estimated peak of the chosen plan, in bytes.
    pub peak_bytes: u64,
    /// Estimated peak with every layer's activations kept, and with every layer recomputed.
    pub peak_keep_bytes: u64,
    pub peak_recompute_bytes: u64,
    /// The budget the estimate was held against (`max_memory`, or what the device has).
    pub budget_bytes: u64,
}

impl MemoryPlan {
    pub fn describe(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mode = match self.recompute_layers {
            0 => "keeping activations".to_string(),
            k if k >= self.layers => "recomputing each layer in the backward".to_string(),
            k => format!(
                "recomputing {k} of {} layers in the backward, keeping the rest",
                self.layers
            ),
        };
        let why = if self.auto { "auto: " } else { "" };
        let over = if self.peak_bytes > self.budget_bytes {
            " (over it: the run may run out of memory)"
        } else {
            ""
        };
        format!(
            "gradient checkpointing ({why}{mode}): estimated peak {:.2} GiB (every layer kept {:.2} GiB, every layer recomputed {:.2} GiB), budget {:.2} GiB{over}",
            gib(self.peak_bytes),
            gib(self.peak_keep_bytes),
            gib(self.peak_recompute_bytes),
            gib(self.budget_bytes)
        )
    }
}

/// The sizes one training micro-batch can reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchShape {
    /// Real tokens (the rows every projection runs on).
    pub tokens: i64,
    pub batch: i64,
    /// The padded length (attention's layout).
    pub seq: i64,
}

/// The largest micro-batch `examples` can form at `size` examples per micro-batch: the
/// `size` longest examples (an upper bound on any batch's tokens and padded length).
pub fn largest_batch(lengths: &[usize], size: usize) -> BatchShape {
    let mut l: Vec<i64> = lengths.iter().map(|&x| x as i64).collect();
    l.sort_unstable_by(|a, b| b.cmp(a));
    let take = size.min(l.len()).max(1);
    let tokens = l.iter().take(take).sum::<i64>().max(1);
    BatchShape {
        tokens,
        batch: take as i64,
        seq: l.first().copied().unwrap_or(1).max(1),
    }
}

/// What one micro-batch adds for `cfg`'s shapes, by the part of the backward that holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activations {
    pub layers: usize,
    /// One layer's saved activations (`model::backward::LayerSaved`).
    pub kept_layer: u64,
    /// One layer's input, all a recomputed layer keeps.
    pub layer_input: u64,
    /// The largest transient of one layer's forward or backward.
    pub transient: u64,
}

impl Activations {
    pub fn of(
        cfg: &LlamaConfig,
        lora_r: i64,
        lora_modules: i64,
        shape: BatchShape,
        kind: Kind,
    ) -> Activations {
        let e = kind.elt_size_in_bytes() as i64;
        let (h, i, layers) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        );
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let sw = &cfg.switches;
        let n = shape.tokens;
        // model::backward::LayerSaved, per token: the layer input, q, k, v, the residual
        // between the blocks, gate and up outputs, two fp32 rstd, the LoRA branches' [N, r]
        // rows, and the inputs of the q/k norms and the sandwich post-norms where the family
        // has them.
        let mut per_token = e * (2 * h + q + 2 * kv + 2 * i) + 8 + e * lora_r * lora_modules;
        if sw.qk_norm {
            per_token += e * (q + kv);
        }
        if sw.sandwich_norms {
            per_token += e * 2 * h;
        }
        // One layer's backward at its busiest: the MLP's [N, i] gradients (about four live
        // at once) or attention's padded q/k/v, output and their gradients; plus the
        // dequantised weight of the widest projection and a few [N, hidden] rows.
        let padded = shape.batch * shape.seq;
        let widest = cfg
            .linear_modules()
            .iter()
            .filter_map(|(_, m)| cfg.linear_shape(m))
            .map(|(a, b)| a * b)
            .max()
            .unwrap_or(0);
        let transient =
            (4 * n * i).max(padded * (2 * (q + 2 * kv) + 2 * q)) * e + widest * e + 4 * n * h * e;
        Activations {
            layers: layers.max(0) as usize,
            kept_layer: (n * per_token) as u64,
            layer_input: (n * h * e) as u64,
            transient: transient as u64,
        }
    }

    /// Bytes at the peak when the first `recompute` layers are recomputed: at the end of the
    /// forward the kept layers' activations and the recomputed layers' inputs; while a layer
    /// is recomputed in the backward, the kept layers are already freed and one layer's
    /// activations are rebuilt on top of the inputs.
    pub fn bytes(&self, recompute: usize) -> u64 {
        let k = recompute.min(self.layers);
        k as u64 * self.layer_input
            + (self.layers - k).max(1) as u64 * self.kept_layer
            + self.transient
    }

    /// The fewest layers to recompute for the peak to fit `room` bytes: 0 when keeping
    /// everything fits; never the last layer, whose recomputation would follow its own
    /// forward at once and save nothing (its activations are the peak either way), so the
    /// last resort is all layers but the last, which may still not fit.
    pub fn fewest_recomputed(&self, room: u64) -> usize {
        let most = self.layers.saturating_sub(1);
        (0..=most).find(|&k| self.bytes(k) <= room).unwrap_or(most)
    }
}

/// Decides `gradient_checkpointing` for a run whose model is loaded and whose training set
/// is encoded. `micro_batch` is the examples one forward holds (per rank and micro-step).
pub fn plan(
    cfg: &Config,
    model: &LlamaConfig,
    trainable_params: u64,
    train: &[Encoded],
    micro_batch: usize,
    device: Device,
) -> Result<MemoryPlan> {
    // A preference pair is two rows of the forward: its chosen and its rejected text.
    let lengths: Vec<usize> = train
        .iter()
        .flat_map(|e| std::iter::once(e.ids.len()).chain(e.rejected.as_ref().map(Vec::len)))
        .collect();
    let rows_per_example = if train.iter().any(|e| e.rejected.is_some()) {
        2
    } else {
        1
    };
    let shape = largest_batch(&lengths, micro_batch * rows_per_example);
    let lora_modules = cfg
        .target_modules
        .iter()
        .filter(|m| model.linear_shape(m).is_some())
        .count() as i64;
    let acts = Activations::of(model, cfg.r, lora_modules, shape, cfg.compute_kind(device));
    let layers = acts.layers;
    let (held, free) = device_memory(device)?;
    // Gradients (fp32) and the optimizer's two moments (8 bit, or fp32 for plain AdamW).
    let per_param = if cfg.optimizer == "adamw" { 12 } else { 6 };
    let base = held + trainable_params * per_param;
    let budget = cfg.max_memory.map_or(held + free, |m| m.0);
    let recompute_layers = match cfg.gradient_checkpointing {
        Checkpointing::Recompute => layers,
        Checkpointing::Keep => 0,
        Checkpointing::Layers(n) if n > layers => bail!(
            "gradient_checkpointing: {n} layers to recompute, but the model has {layers} decoder layers"
        ),
        Checkpointing::Layers(n) => n,
        Checkpointing::Auto => acts.fewest_recomputed(budget.saturating_sub(base)),
    };
    Ok(MemoryPlan {
        recompute_layers,
        layers,
        recompute: recompute_layers > 0,
        auto: cfg.gradient_checkpointing == Checkpointing::Auto,
        peak_bytes: base + acts.bytes(recompute_layers),
        peak_keep_bytes: base + acts.bytes(0),
        peak_recompute_bytes: base + acts.bytes(layers),
        budget_bytes: budget,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_batch_takes_the_longest_examples() {
        let s = largest_batch(&[5, 9, 3, 7], 2);
        assert_eq!(
            s,
            BatchShape {
                tokens: 16,
                batch: 2,
                seq: 9
            }
        );
        assert_eq!(largest_batch(&[4], 8).tokens, 4);
    }

    fn acts() -> Activations {
        Activations {
            layers: 30,
            kept_layer: 9_000,
            layer_input: 1_000,
            transient: 5_000,
        }
    }

    #[test]
    fn every_layer_kept_or_recomputed_is_the_two_ends() {
        let a = acts();
        assert_eq!(a.bytes(0), 30 * 9_000 + 5_000);
        assert_eq!(a.bytes(30), 30 * 1_000 + 9_000 + 5_000);
        // Recomputing the last layer too saves nothing: its activations are the peak anyway.
        assert_eq!(a.bytes(29), 29 * 1_000 + 9_000 + 5_000);
        assert!(a.bytes(29) < a.bytes(30));
        for k in 0..29 {
            assert!(
                a.bytes(k + 1) < a.bytes(k),
                "recomputing one more layer saves memory"
            );
        }
    }

    #[test]
    fn auto_recomputes_the_fewest_layers_that_fit() {
        let a = acts();
        assert_eq!(a.fewest_recomputed(u64::MAX), 0);
        assert_eq!(a.fewest_recomputed(a.bytes(0)), 0);
        for room in [
            a.bytes(0) - 1,
            a.bytes(10),
            a.bytes(10) + 1,
            a.bytes(28),
            a.bytes(29),
        ] {
            let k = a.fewest_recomputed(room);
            assert!(a.bytes(k) <= room, "room {room}: {k} layers do not fit");
            assert!(
                a.bytes(k - 1) > room,
                "room {room}: {} layers would fit",
                k - 1
            );
        }
        assert_eq!(a.fewest_recomputed(a.bytes(10)), 10);
        // Nothing fits: the most that recomputing can save, all layers but the last.
        assert_eq!(a.fewest_recomputed(0), 29);
        let one = Activations { layers: 1, ..a };
        assert_eq!(one.fewest_recomputed(0), 0);
    }

    #[test]
    fn the_plan_line_says_how_many_layers_are_recomputed() {
        let a = acts();
        let plan = |k: usize| MemoryPlan {
            recompute_layers: k,
            layers: 30,
            recompute: k > 0,
            auto: true,
            peak_bytes: a.bytes(k),
            peak_keep_bytes: a.bytes(0),
            peak_recompute_bytes: a.bytes(30),
            budget_bytes: 1 << 30,
        };
        assert!(plan(0).describe().contains("(auto: keeping activations)"));
        assert!(plan(12)
            .describe()
            .contains("(auto: recomputing 12 of 30 layers in the backward, keeping the rest)"));
        assert!(plan(30)
            .describe()
            .contains("(auto: recomputing each layer in the backward)"));
        assert!(!plan(0).describe().contains("over it"));
        let tight = MemoryPlan {
            budget_bytes: 1,
            ..plan(29)
        };
        assert!(tight
            .describe()
            .ends_with("(over it: the run may run out of memory)"));
    }

    #[test]
    fn sizes_parse_with_units() {
        use crate::config::MemorySize;
        assert_eq!(MemorySize::parse("20GiB").unwrap().0, 20 << 30);
        assert_eq!(MemorySize::parse("1.5 GB").unwrap().0, 1_500_000_000);
        assert_eq!(MemorySize::parse("4096").unwrap().0, 4096);
        assert!(MemorySize::parse("12 parsecs").is_err());
        assert!(MemorySize::parse("0").is_err());
    }
}
