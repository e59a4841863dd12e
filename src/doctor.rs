//! `qlora-cls doctor`: what this binary can do on this machine, checked rather than assumed.
//! Each item is one line, `ok`, `absent` (a part this build or machine does not have, which
//! is not an error unless it was asked for) or `FAIL` with what to do; the exit status is 0
//! only when nothing failed.
use crate::config::{Config, Override};
use crate::dist::{self, Dist};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Absent,
    Fail,
}

/// One checked item.
#[derive(Debug)]
pub struct Item {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.status {
            Status::Ok => "  ok  ",
            Status::Absent => "absent",
            Status::Fail => " FAIL ",
        };
        write!(f, "[{tag}] {}: {}", self.name, self.detail)
    }
}

/// The report: every item, in the order they were checked.
#[derive(Debug, Default)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    fn push(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        let item = Item {
            name: name.into(),
            status,
            detail: detail.into(),
        };
        println!("{item}");
        self.items.push(item);
    }

    /// `ok` with `f`'s description, or `FAIL` with its error and `hint`.
    fn check(&mut self, name: &str, hint: &str, f: impl FnOnce() -> Result<String>) {
        match f() {
            Ok(detail) => self.push(name, Status::Ok, detail),
            Err(e) => self.push(name, Status::Fail, format!("{e:#}; {hint}")),
        }
    }

    pub fn first_failure(&self) -> Option<&Item> {
        self.items.iter().find(|i| i.status == Status::Fail)
    }
}

/// Which devices to check: `auto` every usable one (the CPU and each GPU), `cpu`, `cuda`
/// (every GPU; none is a failure) or `cuda:N`.
pub fn devices(setting: &str) -> Result<Vec<Device>> {
    let gpus = crate::hardware::usable_gpus();
    Ok(match setting {
        "auto" => std::iter::once(Device::Cpu)
            .chain((0..gpus).map(Device::Cuda))
            .collect(),
        "cpu" => vec![Device::Cpu],
        "cuda" if gpus == 0 => bail!(
            "--device cuda: {}; run `qlora-cls doctor` without --device to check the CPU",
            crate::hardware::no_gpu_reason()
        ),
        "cuda" => (0..gpus).map(Device::Cuda).collect(),
        other => vec![dist::rank_device(other, 0, 1, gpus)?],
    })
}

/// Runs every check on the devices `setting` names; `work` is a scratch folder for the
/// training step's demo model and run.
pub fn run(setting: &str, work: &std::path::Path) -> Report {
    let mut r = Report::default();
    build(&mut r);
    let devices = match devices(setting) {
        Ok(d) => d,
        Err(e) => {
            r.push("devices", Status::Fail, format!("{e:#}"));
            return r;
        }
    };
    for &d in &devices {
        describe(&mut r, d);
    }
    for &d in &devices {
        kernels(&mut r, d);
    }
    all_reduce(&mut r, &devices);
    let assets = work.join("demo-assets");
    let written = crate::demo::write_demo_assets(&assets);
    for &d in &devices {
        let name = format!("training step on {}", device_name(d));
        match &written {
            Ok(()) => r.check(
                &name,
                "run `qlora-cls train` on the demo to see the whole error",
                || train_step(&assets, &work.join(format!("run-{}", device_name(d))), d),
            ),
            Err(e) => r.push(
                name,
                Status::Fail,
                format!("cannot write the demo model: {e:#}"),
            ),
        }
    }
    r
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

fn build(r: &mut Report) {
    match option_env!("QLORA_BUILD_CUDA_ARCHS") {
        Some(archs) => r.push("CUDA kernels", Status::Ok, format!("compiled for {archs}")),
        None => r.push(
            "CUDA kernels",
            Status::Absent,
            "not compiled in (nvcc was not found at build time, or QLORA_NO_CUDA=1): CPU only",
        ),
    }
    if dist::nccl_compiled() {
        r.push("NCCL", Status::Ok, "compiled into the c10d shim");
    } else {
        r.push(
            "NCCL",
            Status::Absent,
            "the c10d shim was built without nccl.h: several GPUs go through Gloo",
        );
    }
    r.push(
        "Gloo",
        Status::Ok,
        "compiled into the c10d shim (CPU collectives)",
    );
    let built = env!("QLORA_BUILD_TORCH");
    let cuda_rt = if tch::Cuda::is_available() {
        format!(
            "libtorch sees {} CUDA device(s), cuDNN {}",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() {
                "available"
            } else {
                "absent"
            }
        )
    } else {
        "libtorch sees no CUDA device".into()
    };
    r.push(
        "libtorch",
        Status::Ok,
        format!("built against torch/CUDA {built}; {cuda_rt}"),
    );
}

fn describe(r: &mut Report, d: Device) {
    match d {
        Device::Cuda(i) => r.check(
            &format!("device cuda:{i}"),
            "check nvidia-smi and the driver",
            || {
                let info = crate::cuda::device_info(i)?;
                let (major, minor) = info.capability;
                let compiled = option_env!("QLORA_BUILD_CUDA_ARCHS").unwrap_or("");
                let arch = format!("sm_{major}{minor}");
                // sm_90 machine code runs on 9.x only; newer GPUs JIT the compute_90 PTX.
                let runs = compiled.split(',').any(|a| a == arch)
                    || (major * 10 + minor > 90 && compiled.contains("compute_90"));
                if !runs {
                    bail!(
                        "{} is {arch}, which the kernels were not compiled for ({compiled})",
                        info.name
                    );
                }
                Ok(format!(
                    "{}, {:.1} GiB, compute capability {major}.{minor}, {}",
                    info.name,
                    info.total_bytes as f64 / (1u64 << 30) as f64,
                    info.uuid_string()
                ))
            },
        ),
        _ => {
            let threads = tch::get_num_threads();
            let bf16 = if crate::hardware::cpu_has_bf16_matmul() {
                "bf16 matmul instructions: yes (compute dtype auto = bf16)"
            } else {
                "bf16 matmul instructions: no (compute dtype auto = fp32)"
            };
            r.push(
                "device cpu",
                Status::Ok,
                format!("{threads} threads, {bf16}"),
            );
        }
    }
}

/// Each custom kernel against its torch twin on `d` (the self-check `kernels: auto` runs at a
/// run's first use; on CUDA the NF4 dequantize check includes a 14336 x 4096 weight), with
/// both implementations' times.
fn kernels(r: &mut Report, d: Device) {
    use crate::kernel_choice::Kernel;
    if !crate::kernel_choice::custom_available(d) {
        r.push(
            format!("kernels on {}", device_name(d)),
            Status::Absent,
            "no custom kernels for this device: every kernel runs as its torch twin",
        );
        return;
    }
    for k in Kernel::ALL {
        let c = crate::kernels::check(k, d);
        let name = format!("kernel {} on {}", k.name(), device_name(d));
        let times = format!(
            "custom {:.2} ms, torch twin {:.2} ms",
            c.custom_ms, c.torch_ms
        );
        if c.passed() {
            r.push(
                name,
                Status::Ok,
                format!(
                    "{}: max |Δ| {:.1e} <= tol {:.1e}; {times}",
                    c.shape, c.max_abs_diff, c.tol
                ),
            );
        } else {
            r.push(
                name,
                Status::Fail,
                format!(
                    "{}; runs fall back to the twin (`kernels: torch` pins it): report the kernel, \
                     shape and Δ",
                    c.failure_line(k)
                ),
            );
        }
    }
}

/// A one-rank group on 127.0.0.1, and an all-reduce on each backend the devices use: Gloo
/// for CPU tensors, NCCL (or Gloo when forced) for CUDA tensors.
fn all_reduce(r: &mut Report, devices: &[Device]) {
    let group = (|| -> Result<Dist> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free port on 127.0.0.1")?
            .port();
        Dist::new("127.0.0.1", port, 0, 1, 0, Duration::from_secs(30))
    })();
    let group = match group {
        Ok(g) => g,
        Err(e) => {
            r.push(
                "all-reduce",
                Status::Fail,
                format!("{e:#}; a one-rank TCPStore on 127.0.0.1 must work for any launch"),
            );
            return;
        }
    };
    for &d in devices {
        let backend = match d {
            Device::Cuda(_)
                if dist::nccl_compiled()
                    && std::env::var("QLORA_DIST_CUDA_BACKEND").as_deref() != Ok("gloo") =>
            {
                "NCCL"
            }
            _ => "Gloo",
        };
        let name = format!("all-reduce ({backend}, {})", device_name(d));
        r.check(&name, "see docs/dist.md", || {
            let t = Tensor::arange(8, (Kind::Float, d));
            let started = Instant::now();
            group.all_reduce_sum(&t)?;
            let got: Vec<f32> = Vec::try_from(&t.to_device(Device::Cpu))?;
            let want: Vec<f32> = (0..8).map(|i| i as f32).collect();
            if got != want {
                bail!("a one-rank sum changed the tensor: {got:?}");
            }
            Ok(format!(
                "one rank, {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ))
        });
    }
}

/// One optimizer step of the demo's tiny Llama (NF4, LoRA, AdamW8bit) on `d`, with the
/// final evaluation: the whole path of a real run, in seconds.
fn train_step(assets: &std::path::Path, run: &std::path::Path, d: Device) -> Result<String> {
    let _ = std::fs::remove_dir_all(run);
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let pairs = [
        ("model_dir", s(&assets.join("model"))),
        ("data_dir", s(&assets.join("data"))),
        ("results_path", s(run)),
        ("target_modules", "q_proj,v_proj".into()),
        ("max_steps", "1".into()),
        ("epochs", "1".into()),
        ("eval_before_training", "false".into()),
        ("log_every", "1".into()),
        ("device", device_name(d)),
    ];
    let overrides: Vec<Override> = pairs
        .iter()
        .map(|(k, v)| Override {
            key: k.to_string(),
            value: v.clone(),
        })
        .collect();
    let cfg = Config::load(None, &overrides)?.0;
    let started = Instant::now();
    let summary = crate::train::train(&cfg)?;
    if summary.steps != 1 {
        bail!("expected 1 step, the run made {}", summary.steps);
    }
    let eval = summary
        .final_eval
        .context("the run wrote no final evaluation")?;
    let loss = eval
        .get("loss")
        .and_then(|v| v.as_f64())
        .filter(|l| l.is_finite())
        .with_context(|| format!("the final evaluation has no finite loss: {eval}"))?;
    Ok(format!(
        "1 step + evaluation in {:.1} s, eval loss {loss:.4}",
        started.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_settings() {
        assert_eq!(devices("cpu").unwrap(), vec![Device::Cpu]);
        let auto = devices("auto").unwrap();
        assert_eq!(auto[0], Device::Cpu);
        assert_eq!(auto.len(), 1 + crate::hardware::usable_gpus());
        if crate::hardware::usable_gpus() == 0 {
            let e = format!("{:#}", devices("cuda").unwrap_err());
            assert!(
                e.contains("--device cuda") && e.contains(crate::hardware::no_gpu_reason()),
                "{e}"
            );
            assert!(devices("cuda:0").is_err());
        }
        assert!(devices("tpu").is_err());
    }
}
