//! Links libtorch from the project's `.venv` (torch from PyPI) and compiles `kernels/`.
//!
//! * `kernels/*.cpp` are always compiled with `cc` (CPU twins, the c10d shim).
//! * `kernels/*.cu` are compiled with nvcc from the venv (`nvidia-cuda-nvcc`) or `CUDA_HOME`,
//!   for sm_80 and sm_90 plus PTX. A kernel that fails to compile fails the build. Only
//!   `QLORA_NO_CUDA=1` skips nvcc, and it says so.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn venv_dir(manifest: &Path) -> PathBuf {
    match env::var("QLORA_VENV") {
        Ok(v) if !v.is_empty() => PathBuf::from(v),
        _ => manifest.join(".venv"),
    }
}

fn python(venv: &Path) -> PathBuf {
    let p = venv.join("bin").join("python");
    if p.exists() {
        p
    } else {
        PathBuf::from("python3")
    }
}

/// The torch wheel's version line (`2.11.0+cu130 13.0`), its lib folder and include paths.
fn torch_paths(py: &Path) -> (String, PathBuf, Vec<PathBuf>) {
    let out = Command::new(py)
        .args([
            "-c",
            "import os, torch\nfrom torch.utils import cpp_extension as c\nprint(torch.__version__, torch.version.cuda)\nprint(os.path.join(os.path.dirname(torch.__file__), 'lib'))\nfor p in c.include_paths(): print(p)",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run `make setup` first", py.display()));
    if !out.status.success() {
        panic!(
            "{} could not import torch: {}\nrun `make setup` first",
            py.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let version = lines.next().expect("torch version").to_string();
    let lib = PathBuf::from(lines.next().expect("torch lib dir"));
    (version, lib, lines.map(PathBuf::from).collect())
}

fn find_nvcc(venv: &Path) -> Option<PathBuf> {
    if let Ok(home) = env::var("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib).ok()?.flatten() {
        for sub in ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"] {
            let p = entry.path().join("site-packages").join(sub);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

/// What nvcc compiles `kernels/*.cu` for: A100 and H100/H200 machine code, and PTX for newer
/// GPUs to JIT.
const CUDA_TARGETS: [(&str, &str); 3] = [
    ("compute_80", "sm_80"),
    ("compute_90", "sm_90"),
    ("compute_90", "compute_90"),
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let venv = venv_dir(&manifest);
    println!("cargo:rerun-if-env-changed=QLORA_VENV");
    println!("cargo:rerun-if-env-changed=QLORA_NO_CUDA");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rustc-check-cfg=cfg(qlora_cuda)");

    let py = python(&venv);
    let (torch_version, torch_lib, torch_includes) = torch_paths(&py);
    // `qlora-cls doctor` reports what the binary was built against.
    println!("cargo:rustc-env=QLORA_BUILD_TORCH={torch_version}");
    println!("cargo:rustc-link-search=native={}", torch_lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", torch_lib.display());

    // C++ kernels: always.
    let mut cpp: Vec<PathBuf> = std::fs::read_dir(manifest.join("kernels"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    cpp.sort();
    let cu: Vec<PathBuf> = cpp
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .cloned()
        .collect();
    cpp.retain(|p| p.extension().is_some_and(|e| e == "cpp"));
    if !cpp.is_empty() {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(3)
            .flag_if_supported("-fopenmp")
            .flag_if_supported("-march=x86-64-v2")
            .warnings(true)
            .include(manifest.join("kernels"));
        for inc in &torch_includes {
            b.include(inc);
        }
        // kernels/dist.cpp (c10d shim): ProcessGroupNCCL's headers need nccl.h and the CUDA
        // headers of the wheel's nvidia packages; without them the shim is built Gloo-only.
        if let Some(site) = torch_lib.parent().and_then(|p| p.parent()) {
            for sub in ["nvidia/nccl/include", "nvidia/cu13/include"] {
                if site.join(sub).is_dir() {
                    b.include(site.join(sub));
                }
            }
        }
        // kernels/stream.cpp asks libtorch for its current CUDA stream (libc10_cuda).
        let c10_cuda = torch_lib.join("libc10_cuda.so").exists();
        if c10_cuda {
            b.define("QLORA_HAVE_C10_CUDA", None);
        }
        for f in &cpp {
            b.file(f);
        }
        b.compile("qlora_kernels_cpu");
        println!("cargo:rustc-link-lib=gomp");
        if c10_cuda {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-lc10_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }

    // CUDA kernels.
    let no_cuda = env::var("QLORA_NO_CUDA").is_ok_and(|v| v == "1");
    if no_cuda {
        println!("cargo:warning=QLORA_NO_CUDA=1: CUDA kernels are not compiled; CUDA tensors will be refused");
    } else if !cu.is_empty() {
        let nvcc = find_nvcc(&venv).unwrap_or_else(|| {
            panic!(
                "nvcc not found in {} or CUDA_HOME; run `make setup` (installs nvidia-cuda-nvcc), \
                 or set QLORA_NO_CUDA=1 to build without CUDA kernels",
                venv.display()
            )
        });
        let cuda_root = nvcc.parent().unwrap().parent().unwrap().to_path_buf();
        let mut objs = Vec::new();
        for f in &cu {
            let obj = out_dir.join(format!("{}.o", f.file_stem().unwrap().to_string_lossy()));
            let mut cmd = Command::new(&nvcc);
            cmd.args(["-c", "-O3", "-std=c++17", "--expt-relaxed-constexpr"]);
            for (arch, code) in CUDA_TARGETS {
                cmd.args(["-gencode", &format!("arch={arch},code={code}")]);
            }
            let status = cmd
                .args(["-Xcompiler", "-fPIC"])
                .arg("-I")
                .arg(manifest.join("kernels"))
                .arg("-o")
                .arg(&obj)
                .arg(f)
                .status()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            if !status.success() {
                panic!("nvcc failed on {}", f.display());
            }
            objs.push(obj);
        }
        let lib = out_dir.join("libqlora_kernels_cuda.a");
        let _ = std::fs::remove_file(&lib);
        let status = Command::new("ar")
            .arg("crs")
            .arg(&lib)
            .args(&objs)
            .status()
            .expect("ar");
        assert!(status.success(), "ar failed");
        println!("cargo:rustc-link-search=native={}", out_dir.display());
        println!("cargo:rustc-link-lib=static=qlora_kernels_cuda");
        // The CUDA runtime the torch wheel ships (nvidia/cu13/lib), found at run time via rpath.
        let cudart_dir = [cuda_root.join("lib"), cuda_root.join("lib64")]
            .into_iter()
            .find(|d| d.join("libcudart.so.13").exists())
            .unwrap_or_else(|| panic!("libcudart.so.13 not found under {}", cuda_root.display()));
        println!("cargo:rustc-link-search=native={}", cudart_dir.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cudart_dir.display());
        println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
        println!("cargo:rustc-cfg=qlora_cuda");
        let codes: Vec<&str> = CUDA_TARGETS.iter().map(|t| t.1).collect();
        println!("cargo:rustc-env=QLORA_BUILD_CUDA_ARCHS={}", codes.join(","));
    }

    // tch links libtorch_cuda with --as-needed and the linker drops it, since nothing
    // references it by symbol: without it, CUDA is missing at run time.
    if torch_lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
