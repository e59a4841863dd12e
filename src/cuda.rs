//! The CUDA runtime calls tch does not expose (`kernels/device.cu`): the device a rank
//! computes on (set once), what each device is, and its UUID. In a build without CUDA
//! kernels each says so instead.
use anyhow::{bail, Result};

/// One CUDA device as the runtime describes it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub total_bytes: u64,
    pub capability: (i32, i32),
    pub uuid: [u8; 16],
}

impl DeviceInfo {
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi prints it.
    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "GPU-{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

extern "C" {
    fn qlora_current_cuda_stream(device: std::os::raw::c_int) -> *mut std::ffi::c_void;
}

/// libtorch's current stream on CUDA device `index` (`kernels/stream.cpp`), where our kernels
/// launch so that they are ordered with torch's work on the same tensors; null (the legacy
/// default stream) when libtorch has none to give.
pub fn current_stream(index: usize) -> *mut std::ffi::c_void {
    // SAFETY: the shim catches every C++ exception and returns null instead.
    unsafe { qlora_current_cuda_stream(index as std::os::raw::c_int) }
}

#[cfg(qlora_cuda)]
mod ffi {
    use std::os::raw::{c_char, c_int};
    extern "C" {
        pub fn qlora_cuda_set_device(device: c_int) -> c_int;
        pub fn qlora_cuda_device_info(
            device: c_int,
            name: *mut c_char,
            name_len: c_int,
            total_bytes: *mut usize,
            major: *mut c_int,
            minor: *mut c_int,
            uuid16: *mut u8,
        ) -> c_int;
        pub fn qlora_cuda_error_name(code: c_int) -> *const c_char;
    }
}

/// The CUDA runtime's words for error `code`.
pub fn error_name(code: i32) -> String {
    #[cfg(qlora_cuda)]
    {
        // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
        unsafe { std::ffi::CStr::from_ptr(ffi::qlora_cuda_error_name(code)) }
            .to_string_lossy()
            .into_owned()
    }
    #[cfg(not(qlora_cuda))]
    format!("CUDA error {code}")
}

/// Makes `device` the calling thread's current CUDA device (a no-op on the CPU). Called once
/// per process at start, on the thread that runs the model, so that no kernel launch ever
/// switches devices.
pub fn set_device(device: tch::Device) -> Result<()> {
    let tch::Device::Cuda(i) = device else {
        return Ok(());
    };
    #[cfg(qlora_cuda)]
    {
        // SAFETY: plain runtime call with an int argument.
        let rc = unsafe { ffi::qlora_cuda_set_device(i as i32) };
        if rc != 0 {
            bail!(
                "cannot make cuda:{i} the current device: {}",
                error_name(rc)
            );
        }
        Ok(())
    }
    #[cfg(not(qlora_cuda))]
    bail!("cuda:{i}: {}", crate::hardware::no_gpu_reason())
}

/// What the runtime says about CUDA device `index`.
pub fn device_info(index: usize) -> Result<DeviceInfo> {
    #[cfg(qlora_cuda)]
    {
        let mut name = [0 as std::os::raw::c_char; 256];
        let (mut total, mut major, mut minor) = (0usize, 0, 0);
        let mut uuid = [0u8; 16];
        // SAFETY: every out-pointer is valid for the call and sized as the function expects.
        let rc = unsafe {
            ffi::qlora_cuda_device_info(
                index as i32,
                name.as_mut_ptr(),
                name.len() as i32,
                &mut total,
                &mut major,
                &mut minor,
                uuid.as_mut_ptr(),
            )
        };
        if rc != 0 {
            bail!(
                "cannot read the properties of cuda:{index}: {}",
                error_name(rc)
            );
        }
        // SAFETY: the function NUL-terminates `name` within its length.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(DeviceInfo {
            index,
            name,
            total_bytes: total as u64,
            capability: (major, minor),
            uuid,
        })
    }
    #[cfg(not(qlora_cuda))]
    bail!("cuda:{index}: {}", crate::hardware::no_gpu_reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_prints_as_nvidia_smi_does() {
        let d = DeviceInfo {
            index: 0,
            name: "x".into(),
            total_bytes: 0,
            capability: (9, 0),
            uuid: [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x10, 0x32, 0x54, 0x76, 0x98, 0xba,
                0xdc, 0xfe,
            ],
        };
        assert_eq!(d.uuid_string(), "GPU-01234567-89ab-cdef-1032-547698badcfe");
    }

    #[test]
    fn no_gpu_means_the_legacy_default_stream() {
        if tch::Cuda::device_count() == 0 {
            assert!(current_stream(0).is_null());
        }
    }

    #[test]
    fn set_device_on_the_cpu_is_a_no_op() {
        set_device(tch::Device::Cpu).unwrap();
    }
}
