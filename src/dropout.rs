//! LoRA dropout whose mask is a function of (seed, element index) (`kernels/dropout.h`): the
//! backward pass and a checkpointed recomputation regenerate it instead of storing it, and
//! it costs one pass over the input on either device. Torch's own dropout draws a Bernoulli
//! sample per element from a locked generator, serially on the CPU; it was a tenth of a
//! training step there.
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

mod ffi {
    extern "C" {
        pub fn qlora_dropout_cpu(
            x: *const f32,
            y: *mut f32,
            n: i64,
            seed: u64,
            threshold: u32,
            scale: f32,
        ) -> i32;
        #[cfg(qlora_cuda)]
        pub fn qlora_dropout_cuda(
            x: *const f32,
            y: *mut f32,
            n: i64,
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

    /// `x · mask / (1 - p)` for an fp32 tensor `x` (any shape); the same call on the output's
    /// gradient is the backward pass.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
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
        let y = x.empty_like();
        let n = x.numel() as i64;
        let (xp, yp) = (x.data_ptr() as *const f32, y.data_ptr() as *mut f32);
        let (seed, threshold, scale) = (self.seed, self.threshold(), self.scale());
        let status = match x.device() {
            // SAFETY: x and y are contiguous fp32 tensors of n elements on the CPU.
            Device::Cpu => unsafe { ffi::qlora_dropout_cpu(xp, yp, n, seed, threshold, scale) },
            #[cfg(qlora_cuda)]
            Device::Cuda(d) => {
                // SAFETY: as above, on CUDA device d; the legacy default stream orders the
                // kernel with torch's work.
                unsafe {
                    ffi::qlora_dropout_cuda(
                        xp,
                        yp,
                        n,
                        seed,
                        threshold,
                        scale,
                        d as i32,
                        std::ptr::null_mut(),
                    )
                }
            }
            #[cfg(not(qlora_cuda))]
            Device::Cuda(_) => bail!("tensor is on CUDA but this build has no CUDA kernels"),
            other => bail!("dropout runs on CPU or CUDA tensors, not on {other:?}"),
        };
        ensure!(status == 0, "dropout kernel failed (status {status})");
        Ok(y)
    }
}

/// splitmix64: seeds for the dropout calls of one step, layer and projection.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    fn refuses_other_kinds_and_probabilities() {
        let x = Tensor::ones([4], (Kind::BFloat16, Device::Cpu));
        assert!(Dropout { p: 0.1, seed: 0 }.apply(&x).is_err());
        let x = Tensor::ones([4], (Kind::Float, Device::Cpu));
        assert!(Dropout { p: 1.0, seed: 0 }.apply(&x).is_err());
    }
}
