//! LoRA dropout whose mask is a function of (seed, element index) (`kernels/dropout.h`): the
//! backward pass and a checkpointed recomputation regenerate it instead of storing it, and
//! it costs one pass over the input on either device. In training the index of a token's
//! element comes from a row key (the example's place in the global batch and the token's
//! position, see [`row_key`]), not from where the token happens to sit in this process's
//! tensor: one process, N ranks, any padding and gradient accumulation draw the same masks. Torch's own dropout draws a Bernoulli
//! sample per element from a locked generator, serially on the CPU; it was a tenth of a
//! training step there.
use crate::kernel_choice::{self, Impl, Kernel};
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

mod ffi {
    extern "C" {
        pub fn qlora_dropout_cpu(
            x: *const f32,
            y: *mut f32,
            rows: i64,
            width: i64,
            row_keys: *const i64,
            seed: u64,
            threshold: u32,
            scale: f32,
        ) -> i32;
        #[cfg(qlora_cuda)]
        pub fn qlora_dropout_cuda(
            x: *const f32,
            y: *mut f32,
            rows: i64,
            width: i64,
            row_keys: *const i64,
            seed: u64,
            threshold: u32,
            scale: f32,
            device: i32,
            stream: *mut std::ffi::c_void,
        ) -> i32;
    }
}

/// The mask of one dropout call: drop probability `p` and the seed the mask derives from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    /// `threshold / 2³²` is the drop probability.
    fn threshold(&self) -> u32 {
        (self.p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
    }

    /// Torch's scale for kept elements, `1 / (1 - p)` rounded once to f32.
    fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    /// `x · mask / (1 - p)` for an fp32 tensor `x` (any shape), element i of the flat tensor
    /// keyed by i; the same call on the output's gradient is the backward pass.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, 1, x.numel() as i64, None)
    }

    /// As [`Self::apply`] for rows `x` `[N, width]` whose row r is keyed by `row_keys[r]`
    /// (`[N]` int64 on x's device): element j of row r has index `row_keys[r]·width + j`.
    pub fn apply_rows(&self, x: &Tensor, row_keys: &Tensor) -> Result<Tensor> {
        let s = x.size();
        ensure!(
            s.len() == 2 && row_keys.size() == [s[0]],
            "dropout rows {s:?} need one key each, got keys {:?}",
            row_keys.size()
        );
        ensure!(
            row_keys.kind() == Kind::Int64 && row_keys.device() == x.device(),
            "dropout row keys must be int64 on {:?}, got {:?} on {:?}",
            x.device(),
            row_keys.kind(),
            row_keys.device()
        );
        let keys = row_keys.contiguous();
        self.run(x, s[0], s[1], Some(&keys))
    }

    fn run(&self, x: &Tensor, rows: i64, width: i64, keys: Option<&Tensor>) -> Result<Tensor> {
        let imp = kernel_choice::choose(Kernel::Dropout, x.device(), check);
        self.run_with(x, rows, width, keys, imp)
    }

    /// The mask applied to `x` seen as `rows` × `width`, by the given implementation.
    pub fn run_with(
        &self,
        x: &Tensor,
        rows: i64,
        width: i64,
        keys: Option<&Tensor>,
        imp: Impl,
    ) -> Result<Tensor> {
        ensure!(
            (0.0..1.0).contains(&self.p),
            "dropout probability must be in [0, 1), got {}",
            self.p
        );
        ensure!(
            x.kind() == Kind::Float,
            "LoRA dropout runs on fp32 tensors, got {:?}",
            x.kind()
        );
        let x = x.contiguous();
        ensure!(
            rows * width == x.numel() as i64,
            "dropout: {rows} rows of {width} do not cover {} elements",
            x.numel()
        );
        let (seed, threshold, scale) = (self.seed, self.threshold(), self.scale());
        if imp == Impl::Torch {
            let y = crate::dropout_torch::apply(&x, rows, width, keys, seed, threshold, scale)?;
            return Ok(y.view_as(&x));
        }
        let y = x.empty_like();
        let (xp, yp) = (x.data_ptr() as *const f32, y.data_ptr() as *mut f32);
        let kp = keys.map_or(std::ptr::null(), |k| k.data_ptr() as *const i64);
        let status = match x.device() {
            // SAFETY: x and y are contiguous fp32 tensors of rows·width elements on the CPU,
            // keys (when given) a contiguous int64 tensor of `rows` entries there.
            Device::Cpu => unsafe {
                ffi::qlora_dropout_cpu(xp, yp, rows, width, kp, seed, threshold, scale)
            },
            #[cfg(qlora_cuda)]
            Device::Cuda(d) => {
                // SAFETY: as above, on CUDA device d; libtorch's current stream orders the
                // kernel with torch's work on x and y.
                unsafe {
                    ffi::qlora_dropout_cuda(
                        xp,
                        yp,
                        rows,
                        width,
                        kp,
                        seed,
                        threshold,
                        scale,
                        d as i32,
                        crate::cuda::current_stream(d),
                    )
                }
            }
            #[cfg(not(qlora_cuda))]
            Device::Cuda(_) => bail!("tensor is on CUDA but this build has no CUDA kernels"),
            other => bail!("dropout runs on CPU or CUDA tensors, not on {other:?}"),
        };
        ensure!(
            status == 0,
            "the LoRA dropout kernel failed on {:?}: {} (status {status})",
            x.device(),
            crate::cuda::error_name(status)
        );
        kernel_choice::inject_fault(Kernel::Dropout, &y);
        Ok(y)
    }
}

/// What a training forward's LoRA dropout call is keyed by: its seed and, for input rows,
/// each row's key ([`row_key`]); without row keys an element is keyed by its flat index.
#[derive(Debug)]
pub struct MaskKey {
    pub seed: u64,
    pub rows: Option<Tensor>,
}

impl Clone for MaskKey {
    fn clone(&self) -> Self {
        MaskKey {
            seed: self.seed,
            rows: self.rows.as_ref().map(Tensor::shallow_clone),
        }
    }
}

impl From<u64> for MaskKey {
    fn from(seed: u64) -> Self {
        MaskKey { seed, rows: None }
    }
}

impl MaskKey {
    /// `x · mask / (1 - p)` with the mask this key names for drop probability `p`.
    pub fn apply(&self, p: f64, x: &Tensor) -> Result<Tensor> {
        let d = Dropout { p, seed: self.seed };
        match &self.rows {
            Some(keys) => d.apply_rows(x, keys),
            None => d.apply(x),
        }
    }
}

/// Token positions below this fit a row key; longer sequences are refused.
pub const MAX_POSITIONS: i64 = 1 << 24;

/// The dropout key of a token: its example's index in the global batch and its position in
/// the sequence. Neither depends on how the batch was split, padded or accumulated.
pub fn row_key(example: i64, position: i64) -> i64 {
    example * MAX_POSITIONS + position
}

/// The self-check of the dropout kernel: row keys past 2^32 and a flat call.
pub fn check(device: Device) -> crate::kernel_choice::Check {
    use crate::kernel_check::randn;
    crate::kernel_check::run(
        device,
        vec![(
            "[5, 77] row keys past 2^32 + [1000] flat".into(),
            Box::new(move |imp| {
                let x = randn(5 * 77, 9, 1.0, device).reshape([5, 77]);
                let keys = Tensor::from_slice(&[0, 3, (1i64 << 33) + 5, row_key(7, 9), 1])
                    .to_device(device);
                let d = Dropout {
                    p: 0.1,
                    seed: 0x1234_5678_9abc,
                };
                let flat = randn(1000, 10, 1.0, device);
                let d2 = Dropout { p: 0.3, seed: 77 };
                Ok(vec![
                    d.run_with(&x, 5, 77, Some(&keys), imp)?,
                    d2.run_with(&flat, 1, 1000, None, imp)?,
                ])
            }),
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_expected_fraction_scaled_and_is_its_own_backward() {
        let x = Tensor::ones([1_000_000], (Kind::Float, Device::Cpu));
        let d = Dropout { p: 0.1, seed: 7 };
        let y = d.apply(&x).unwrap();
        let kept = y
            .ne(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.9).abs() < 2e-3, "kept {kept}");
        let scale = (1.0f64 / 0.9) as f32 as f64;
        assert_eq!(y.max().double_value(&[]), scale);
        // Same seed, same mask; another seed, another mask.
        assert!(d.apply(&x).unwrap().equal(&y));
        let other = Dropout { p: 0.1, seed: 8 }.apply(&x).unwrap();
        assert!(!other.equal(&y));
        // Applied to a gradient, it is the transpose of itself (a diagonal map).
        let g = Tensor::randn([1_000_000], (Kind::Float, Device::Cpu));
        let lhs = (d.apply(&x).unwrap() * &g)
            .sum(Kind::Double)
            .double_value(&[]);
        let rhs = (&x * d.apply(&g).unwrap())
            .sum(Kind::Double)
            .double_value(&[]);
        assert!((lhs - rhs).abs() <= 1e-6 * lhs.abs().max(1.0));
        // p = 0 keeps everything unchanged.
        assert!(Dropout { p: 0.0, seed: 1 }.apply(&g).unwrap().equal(&g));
    }

    #[test]
    fn row_keys_name_elements_whatever_the_layout() {
        let d = Dropout { p: 0.3, seed: 11 };
        let x = Tensor::randn([6, 40], (Kind::Float, Device::Cpu));
        // Keys 0..N are the flat layout.
        let flat = Tensor::arange(6, (Kind::Int64, Device::Cpu));
        assert!(d
            .apply_rows(&x, &flat)
            .unwrap()
            .equal(&d.apply(&x).unwrap()));
        // Rows keep their mask when reordered or taken apart.
        let keys = Tensor::from_slice(&[row_key(3, 0), row_key(3, 1), row_key(0, 5)]);
        let x3 = x.narrow(0, 0, 3);
        let all = d.apply_rows(&x3, &keys).unwrap();
        let perm = Tensor::from_slice(&[2i64, 0, 1]);
        let permuted = d
            .apply_rows(&x3.index_select(0, &perm), &keys.index_select(0, &perm))
            .unwrap();
        assert!(permuted.equal(&all.index_select(0, &perm)));
        let one = d
            .apply_rows(&x3.narrow(0, 1, 1), &keys.narrow(0, 1, 1))
            .unwrap();
        assert!(one.equal(&all.narrow(0, 1, 1)));
        // A large key (indices past 2^32) still drops about p.
        let big = Tensor::ones([4, 100_000], (Kind::Float, Device::Cpu));
        let keys = Tensor::from_slice(&[row_key(7, 9), row_key(1 << 20, 3), 5, 6]);
        let y = d.apply_rows(&big, &keys).unwrap();
        let kept = y
            .ne(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.7).abs() < 5e-3, "kept {kept}");
        assert!(d.apply_rows(&big, &keys.narrow(0, 0, 2)).is_err());
    }

    #[test]
    fn refuses_other_kinds_and_probabilities() {
        let x = Tensor::ones([4], (Kind::BFloat16, Device::Cpu));
        assert!(Dropout { p: 0.1, seed: 0 }.apply(&x).is_err());
        let x = Tensor::ones([4], (Kind::Float, Device::Cpu));
        assert!(Dropout { p: 1.0, seed: 0 }.apply(&x).is_err());
    }
}
