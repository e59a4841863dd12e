//! One optimizer step's gradient. The global batch (`batch_size` examples) is split into
//! contiguous parts, one per rank (accelerate's `split_batches`), and each rank's part into
//! `gradient_accumulation_steps` micro-batches. Each micro-batch's mean loss is weighted by
//! its share of the global batch before its backward, so the gradients summed over
//! micro-batches and ranks are the global batch's mean gradient, whatever the split (a short
//! last batch of an epoch included). LoRA dropout is keyed by each example's index in the
//! global batch, so every split draws the masks one process draws.
use crate::data::batch::{collate, Encoded};
use crate::dist;
use crate::model::classifier::{BatchPart, LlamaClassifier};
use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

/// One micro-batch: indices into the training set, and where it sits in the global batch.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroBatch {
    pub items: Vec<usize>,
    pub part: BatchPart,
}

/// The non-empty micro-batches rank `rank` of `world` runs for global batch `batch`, split
/// into `accumulation` micro-steps.
pub fn micro_batches(
    batch: &[usize],
    rank: usize,
    world: usize,
    accumulation: usize,
) -> Vec<MicroBatch> {
    let n = batch.len();
    let mine = dist::part_range(n, rank, world);
    (0..accumulation)
        .map(|m| dist::part_range(mine.len(), m, accumulation))
        .filter(|r| !r.is_empty())
        .map(|r| {
            let (start, end) = (mine.start + r.start, mine.start + r.end);
            MicroBatch {
                items: batch[start..end].to_vec(),
                part: BatchPart {
                    first_example: start as i64,
                    loss_weight: (end - start) as f64 / n as f64,
                },
            }
        })
        .collect()
}

/// Forward and backward of this rank's micro-batches of one global batch at optimizer step
/// `step`, accumulating into the trainable tensors' `.grad`. Returns this rank's share of
/// the global batch's mean loss and its real token count.
pub fn accumulate_gradients(
    model: &LlamaClassifier,
    data: &[Encoded],
    micro: &[MicroBatch],
    step: usize,
    pad_id: i64,
    device: Device,
) -> Result<(f64, i64)> {
    // The loss stays on the device until the step's end: one read-back per step, not one
    // per micro-batch between its forward and its backward.
    let (mut loss, mut tokens) = (Tensor::zeros([], (Kind::Double, device)), 0i64);
    for m in micro {
        let items: Vec<&Encoded> = m.items.iter().map(|&i| &data[i]).collect();
        let b = collate(&items, pad_id);
        let labels = b
            .labels
            .as_ref()
            .context("training examples must have labels")?
            .to_device(device);
        // Ids and mask stay on the host: the model copies them over and works out the rows
        // there, without waiting on the device.
        let (part_loss, _) = model.forward_backward_part(
            &b.input_ids,
            &b.attention_mask,
            &labels,
            &m.part,
            step as u64,
        )?;
        loss += part_loss.to_kind(Kind::Double) * m.part.loss_weight;
        tokens += b.n_tokens;
    }
    Ok((loss.double_value(&[]), tokens))
}

/// L2 norm of all gradients (optionally clipped to `max_norm`, as torch's clip_grad_norm_).
pub fn grad_norm(params: &[Tensor], max_norm: Option<f64>) -> f64 {
    let _g = tch::no_grad_guard();
    // One reduction on the device and one host sync per step, not one per tensor.
    let squares: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
        .collect();
    let norm = if squares.is_empty() {
        0.0
    } else {
        Tensor::stack(&squares, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[])
    };
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every split covers the global batch once, in order, with weights summing to 1 and
    /// each example's global index as the key of its part.
    #[test]
    fn micro_batches_partition_the_global_batch() {
        for n in [1usize, 5, 8, 13] {
            let batch: Vec<usize> = (100..100 + n).collect();
            for world in [1usize, 2, 3, 4] {
                for acc in [1usize, 2, 3] {
                    let mut seen = Vec::new();
                    let mut weight = 0.0;
                    for rank in 0..world {
                        for m in micro_batches(&batch, rank, world, acc) {
                            assert!(!m.items.is_empty());
                            assert_eq!(m.part.first_example as usize, seen.len());
                            assert_eq!(m.part.loss_weight, m.items.len() as f64 / n as f64);
                            weight += m.part.loss_weight;
                            seen.extend(m.items);
                        }
                    }
                    assert_eq!(seen, batch, "n {n} world {world} acc {acc}");
                    assert!((weight - 1.0).abs() < 1e-12);
                }
            }
        }
        // 8 examples, 2 ranks, 2 micro-steps: 2 per micro-step.
        let parts = micro_batches(&(0..8).collect::<Vec<_>>(), 1, 2, 2);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].items, vec![6, 7]);
        assert_eq!(parts[1].part.first_example, 6);
    }
}
