//! What this machine can compute with, detected once: native bf16 matmuls on the CPU, the
//! GPUs usable by this build, and the memory a process holds and may still take. A leaf: the config, the kernels and the device code all
//! ask it, and it asks nothing of them.

/// Whether this CPU multiplies bf16 natively, from the kernel's feature flags
/// (`/proc/cpuinfo`); `QLORA_CPU_BF16=0/1` overrides (e.g. for a container that hides them).
pub fn cpu_has_bf16_matmul() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| match std::env::var("QLORA_CPU_BF16").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => std::fs::read_to_string("/proc/cpuinfo")
            .map(|text| cpuinfo_has_bf16(&text))
            .unwrap_or(false),
    })
}

fn cpuinfo_has_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .take(1)
        .flat_map(|l| {
            l.split_once(':')
                .map(|x| x.1)
                .unwrap_or("")
                .split_whitespace()
        })
        .any(|f| matches!(f, "avx512_bf16" | "amx_bf16" | "bf16"))
}

/// GPUs this process can compute on: those libtorch sees, when this build has the CUDA
/// kernels every NF4, optimizer and dropout op needs; none otherwise (so `device: auto`
/// picks the CPU in a build without nvcc instead of failing at the first NF4 op).
pub fn usable_gpus() -> usize {
    if cfg!(qlora_cuda) {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    } else {
        0
    }
}

/// Why [`usable_gpus`] is 0, for messages.
pub fn no_gpu_reason() -> &'static str {
    if cfg!(qlora_cuda) {
        "libtorch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"
    } else {
        "this build has no CUDA kernels (nvcc was not found at build time, or QLORA_NO_CUDA=1)"
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// Resident memory of this process now (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// Memory the kernel could give this process without swapping (MemAvailable), in bytes.
pub fn available_ram_bytes() -> u64 {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

fn proc_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// (used, free) bytes of a CUDA device.
#[cfg(qlora_cuda)]
fn cuda_memory(index: usize) -> anyhow::Result<(u64, u64)> {
    extern "C" {
        fn qlora_cuda_mem_get_info(device: i32, free: *mut usize, total: *mut usize) -> i32;
    }
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both out-pointers are valid for the call; the function only writes them.
    let rc = unsafe { qlora_cuda_mem_get_info(index as i32, &mut free, &mut total) };
    if rc != 0 {
        anyhow::bail!("cannot read the memory of cuda:{index} (CUDA error {rc})");
    }
    Ok(((total - free) as u64, free as u64))
}

#[cfg(not(qlora_cuda))]
fn cuda_memory(index: usize) -> anyhow::Result<(u64, u64)> {
    anyhow::bail!("cannot read the memory of cuda:{index}: built without CUDA")
}

/// (what the process holds now, what it may still take) on `device`.
pub fn device_memory(device: tch::Device) -> anyhow::Result<(u64, u64)> {
    Ok(match device {
        tch::Device::Cuda(i) => cuda_memory(i)?,
        _ => (rss_bytes(), available_ram_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_flags() {
        assert!(cpuinfo_has_bf16(
            "processor: 0\nflags\t: fpu avx2 avx512f avx512_bf16 amx_tile\n"
        ));
        assert!(cpuinfo_has_bf16("Features\t: fp asimd bf16 i8mm\n"));
        assert!(!cpuinfo_has_bf16("flags\t: fpu avx avx2 fma\n"));
        assert!(!cpuinfo_has_bf16(""));
    }
}
