//! The C ABI of the AdamW update kernels (`kernels/optim8bit.h`, CPU and CUDA): the per-step
//! scalars, bitsandbytes' dynamic code map and the kernels' own table self-check. Shared by
//! the optimizer (`adamw8bit`) and its torch twin (`adamw_torch`).
use anyhow::{ensure, Result};
use std::sync::OnceLock;

/// Quantization block of the 8-bit states.
pub const BLOCK: i64 = 256;
/// Per-step scalars handed to the kernels (layout of `QloraAdamScalars` in optim8bit.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalars {
    pub(crate) beta1: f32,
    pub(crate) omb1: f32,
    pub(crate) beta2: f32,
    pub(crate) omb2: f32,
    pub(crate) eps: f32,
    pub(crate) correction2: f32,
    pub(crate) decay: f32,
    pub(crate) step_size: f32,
    pub(crate) apply_decay: i32,
}

pub(crate) mod c {
    use super::Scalars;
    extern "C" {
        pub fn qlora_adam_bnb8_cpu(
            p: *mut f32,
            g: *const f32,
            q1: *mut u8,
            q2: *mut u8,
            absmax1: *mut f32,
            absmax2: *mut f32,
            n: i64,
            s: Scalars,
        );
        pub fn qlora_adam_bnb32_cpu(
            p: *mut f32,
            g: *const f32,
            m: *mut f32,
            v: *mut f32,
            n: i64,
            s: Scalars,
        );
        pub fn qlora_adam_torch32_cpu(
            p: *mut f32,
            g: *const f32,
            m: *mut f32,
            v: *mut f32,
            n: i64,
            s: Scalars,
        );
        pub fn qlora_dequant_dynamic_cpu(
            q: *const u8,
            absmax: *const f32,
            is_signed: i32,
            n: i64,
            out: *mut f32,
        );
        pub fn qlora_dynamic_code(is_signed: i32, out256: *mut f32);
        pub fn qlora_optim8bit_selfcheck() -> i32;
    }
    #[cfg(qlora_cuda)]
    extern "C" {
        pub fn qlora_adam_bnb8_cuda(
            p: *mut f32,
            g: *const f32,
            q1: *mut u8,
            q2: *mut u8,
            absmax1: *mut f32,
            absmax2: *mut f32,
            n: i64,
            s: Scalars,
            device: i32,
            stream: *mut std::ffi::c_void,
        ) -> i32;
        pub fn qlora_adam_bnb32_cuda(
            p: *mut f32,
            g: *const f32,
            m: *mut f32,
            v: *mut f32,
            n: i64,
            s: Scalars,
            device: i32,
            stream: *mut std::ffi::c_void,
        ) -> i32;
        pub fn qlora_adam_torch32_cuda(
            p: *mut f32,
            g: *const f32,
            m: *mut f32,
            v: *mut f32,
            n: i64,
            s: Scalars,
            device: i32,
            stream: *mut std::ffi::c_void,
        ) -> i32;
    }
}

/// bitsandbytes' `create_dynamic_map(signed)`: the 256 codes of the 8-bit state maps.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut out = [0f32; 256];
    // SAFETY: the kernel writes exactly 256 floats.
    unsafe { c::qlora_dynamic_code(signed as i32, out.as_mut_ptr()) };
    out
}

/// The compiled code tables must agree with the lookup the kernels derive from them; checked
/// once per process before the first 8-bit update.
pub(crate) fn tables_ok() -> Result<()> {
    static CHECK: OnceLock<i32> = OnceLock::new();
    // SAFETY: no arguments; reads only the kernel's constant tables.
    let code = *CHECK.get_or_init(|| unsafe { c::qlora_optim8bit_selfcheck() });
    ensure!(
        code == 0,
        "8-bit optimizer kernel tables are inconsistent (self-check code {code})"
    );
    Ok(())
}
