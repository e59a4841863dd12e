//! Data-parallel communication on libtorch's own c10d: a `TCPStore` rendezvous, Gloo for CPU
//! tensors and NCCL for CUDA tensors, through the C shim in `kernels/dist.cpp`.
//!
//! Ranks are started by `scripts/launch.sh`, torchrun or SLURM; [`Dist::from_env`] reads their
//! variables. Every collective is bounded by the timeout given at start-up, and a failure caused
//! by a peer that died, hung or left names that rank in the error (see `docs/dist.md`).
//!
//! Batch helpers follow accelerate: [`part_range`] (`split_batches=True`, used by
//! `train::micro_batches`) for training and
//! [`shard_indices`] / [`unshard`] (`even_batches=True`) for evaluation.
//!
//! Why one file: the rendezvous, the collectives and the rank/device helpers share one error
//! discipline (a dead, hung or departed peer named by rank), which reads best in one place;
//! a sixth of the length is its tests.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

/// Gradient buckets are capped like DDP's default `bucket_cap_mb=25`.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

#[repr(C)]
struct QdGroup {
    _opaque: [u8; 0],
}

extern "C" {
    fn qd_init(
        master_addr: *const c_char,
        port: c_int,
        rank: c_int,
        world_size: c_int,
        local_rank: c_int,
        timeout_ms: i64,
        out: *mut *mut QdGroup,
    ) -> c_int;
    fn qd_all_reduce_sum(g: *mut QdGroup, tensor: *mut c_void) -> c_int;
    fn qd_broadcast(g: *mut QdGroup, tensor: *mut c_void, root: c_int) -> c_int;
    fn qd_all_gather(
        g: *mut QdGroup,
        input: *mut c_void,
        outputs: *const *mut c_void,
        n_outputs: c_int,
    ) -> c_int;
    fn qd_barrier(g: *mut QdGroup) -> c_int;
    fn qd_collectives_started(g: *mut QdGroup) -> i64;
    fn qd_nccl_compiled() -> c_int;
    fn qd_nccl_watchdog_timeout_ms(timeout_ms: i64) -> i64;
    fn qd_wait_selftest(completes_after_ms: i64, fails: c_int, timeout_ms: i64) -> c_int;
    fn qd_last_error() -> *const c_char;
    fn qd_destroy(g: *mut QdGroup);
}

/// Error codes of `kernels/dist.h`, for messages.
fn code_name(code: c_int) -> &'static str {
    match code {
        1 => "invalid argument",
        2 => "rendezvous failed",
        3 => "collective failed",
        4 => "timeout",
        5 => "peer lost",
        6 => "no NCCL support",
        7 => "process group broken",
        _ => "internal error",
    }
}

fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string, valid until its next call
    // on this thread; it is copied at once.
    unsafe {
        let p = qd_last_error();
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn check(code: c_int) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        bail!("{} ({})", last_error(), code_name(code))
    }
}

/// True when the shim was compiled with ProcessGroupNCCL (CUDA tensors can be communicated).
pub fn nccl_compiled() -> bool {
    // SAFETY: pure query.
    unsafe { qd_nccl_compiled() != 0 }
}

/// The timeout the shim gives NCCL's own watchdog for a collective timeout of `timeout`:
/// longer than our deadline, lost-rank diagnosis and last-resort watchdog, so the error that
/// names a lost rank is printed before NCCL tears the process down.
pub fn nccl_watchdog_timeout(timeout: Duration) -> Duration {
    let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 4);
    // SAFETY: pure arithmetic in the shim.
    Duration::from_millis(u64::try_from(unsafe { qd_nccl_watchdog_timeout_ms(ms) }).unwrap_or(0))
}

/// Runs the shim's collective-wait logic on a scripted work that claims success from `wait()`
/// at once (as NCCL's non-blocking wait does) and completes after `completes_after`, failing
/// then when `fails`. For tests: the same code waits for every real collective.
pub fn wait_selftest(completes_after: Duration, fails: bool, timeout: Duration) -> Result<()> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    // SAFETY: self-contained in the shim.
    check(unsafe { qd_wait_selftest(ms(completes_after), c_int::from(fails), ms(timeout)) })
}

/// The tensor pointer the shim expects: tch's `C_tensor` is a `torch::Tensor*`.
fn raw(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// One rank's membership in the process group. Not `Sync`: collectives must be issued from
/// one thread at a time, in the same order on every rank.
pub struct Dist {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Ranks on this node (LOCAL_WORLD_SIZE; the world when the launcher does not say).
    pub local_world_size: usize,
    timeout: Duration,
    group: NonNull<QdGroup>,
}

// SAFETY: the C++ group may be used from any thread, just not concurrently, which `!Sync`
// (from the raw pointer) already rules out.
unsafe impl Send for Dist {}

/// Launcher variables: torchrun's, else SLURM's.
struct EnvVars {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    local_world_size: usize,
    master_addr: String,
    master_port: u16,
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<usize>().map(Some).with_context(|| {
            format!("environment variable {name}={v:?} is not a non-negative integer")
        }),
        _ => Ok(None),
    }
}

fn read_env() -> Result<Option<EnvVars>> {
    let (rank, world_size, local_rank, local_world, slurm) = match env_usize("WORLD_SIZE")? {
        Some(w) => {
            let rank = env_usize("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            let local = env_usize("LOCAL_RANK")?;
            (rank, w, local, env_usize("LOCAL_WORLD_SIZE")?, false)
        }
        None => match env_usize("SLURM_NTASKS")? {
            Some(w) => {
                let rank = env_usize("SLURM_PROCID")?
                    .context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
                // SLURM_NTASKS_PER_NODE reads like "4" or "4(x2)".
                let per_node = std::env::var("SLURM_NTASKS_PER_NODE").ok().and_then(|v| {
                    v.split(['(', ','])
                        .next()
                        .and_then(|n| n.trim().parse::<usize>().ok())
                });
                (rank, w, env_usize("SLURM_LOCALID")?, per_node, true)
            }
            None => return Ok(None),
        },
    };
    if world_size <= 1 {
        return Ok(None);
    }
    if rank >= world_size {
        bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
    }
    let master_addr = match std::env::var("MASTER_ADDR") {
        Ok(a) if !a.trim().is_empty() => a.trim().to_string(),
        _ if slurm => bail!(
            "SLURM job with {world_size} tasks but MASTER_ADDR is not set; e.g. \
             export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)"
        ),
        _ => "127.0.0.1".to_string(),
    };
    let master_port = match std::env::var("MASTER_PORT") {
        Ok(p) if !p.trim().is_empty() => p
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("MASTER_PORT={p:?} is not a valid TCP port"))?,
        _ => 29500, // torchrun's default
    };
    Ok(Some(EnvVars {
        rank,
        world_size,
        // Without a local rank (plain RANK/WORLD_SIZE), all ranks are assumed to share the node.
        local_rank: local_rank.unwrap_or(rank),
        local_world_size: local_world.unwrap_or(world_size),
        master_addr,
        master_port,
    }))
}

/// Tensors of one device and dtype, in caller order, as (index, bytes).
type Group = Vec<(usize, usize)>;

/// Groups tensors by (device, dtype), keeping the caller's order inside each group, so a
/// bucket never mixes types and every rank builds the same buckets.
fn group_by_type(tensors: &[Tensor]) -> Vec<Group> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for (i, t) in tensors.iter().enumerate() {
        let key = format!("{:?}/{:?}", t.device(), t.kind());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        groups.entry(key).or_default().push((i, bytes));
    }
    groups.into_values().collect()
}

/// Splits consecutive tensors of a group into buckets of at most `cap` bytes; a tensor larger
/// than `cap` gets a bucket of its own. Returns the group positions of each bucket.
pub fn plan_buckets(sizes_bytes: &[usize], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0usize;
    for (i, &b) in sizes_bytes.iter().enumerate() {
        if i > start && used + b > cap {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += b;
    }
    if start < sizes_bytes.len() {
        out.push(start..sizes_bytes.len());
    }
    out
}

impl Dist {
    /// Joins the process group described by the launcher variables (MASTER_ADDR, MASTER_PORT,
    /// RANK, WORLD_SIZE, LOCAL_RANK; else SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
    /// None when no launcher variables are set (single process) or WORLD_SIZE=1.
    pub fn from_env(timeout: Duration) -> Result<Option<Dist>> {
        match read_env()? {
            None => Ok(None),
            Some(e) => {
                let mut d = Dist::new(
                    &e.master_addr,
                    e.master_port,
                    e.rank,
                    e.world_size,
                    e.local_rank,
                    timeout,
                )?;
                d.local_world_size = e.local_world_size;
                Ok(Some(d))
            }
        }
    }

    /// Joins a process group explicitly (rank 0 hosts the TCPStore at `master_addr:port`).
    /// Unlike [`Dist::from_env`] this also builds one-rank groups.
    pub fn new(
        master_addr: &str,
        port: u16,
        rank: usize,
        world_size: usize,
        local_rank: usize,
        timeout: Duration,
    ) -> Result<Dist> {
        let addr = CString::new(master_addr).context("MASTER_ADDR contains a NUL byte")?;
        let to_int = |v: usize, what: &str| {
            c_int::try_from(v).with_context(|| format!("{what}={v} does not fit a C int"))
        };
        let timeout_ms = i64::try_from(timeout.as_millis().max(1)).unwrap_or(i64::MAX);
        let mut g: *mut QdGroup = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim validates the numbers.
        let code = unsafe {
            qd_init(
                addr.as_ptr(),
                c_int::from(port),
                to_int(rank, "rank")?,
                to_int(world_size, "world size")?,
                to_int(local_rank, "local rank")?,
                timeout_ms,
                &mut g,
            )
        };
        check(code).with_context(|| {
            format!(
                "joining the process group at {master_addr}:{port} as rank {rank} of {world_size}"
            )
        })?;
        let group = NonNull::new(g).context("the c10d shim returned no process group")?;
        Ok(Dist {
            rank,
            world_size,
            local_rank,
            local_world_size: world_size,
            timeout,
            group,
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The device this rank computes on for the `device` setting (see [`rank_device`]).
    pub fn device_for(&self, setting: &str) -> Result<Device> {
        rank_device(
            setting,
            self.local_rank,
            self.local_world_size,
            crate::hardware::usable_gpus(),
        )
    }

    /// Collectives this rank has started so far (one per bucket for the bucketed calls).
    pub fn collectives_started(&self) -> u64 {
        // SAFETY: live group; a plain counter read.
        let n = unsafe { qd_collectives_started(self.ptr()) };
        u64::try_from(n).unwrap_or(0)
    }

    fn ptr(&self) -> *mut QdGroup {
        self.group.as_ptr()
    }

    /// In-place sum of one contiguous tensor.
    fn reduce_contiguous(&self, t: &Tensor) -> Result<()> {
        // SAFETY: live group, live tensor; the shim checks density/contiguity/device.
        check(unsafe { qd_all_reduce_sum(self.ptr(), raw(t)) })
    }

    fn broadcast_contiguous(&self, t: &Tensor, root: usize) -> Result<()> {
        let root = c_int::try_from(root).context("root rank does not fit a C int")?;
        // SAFETY: as above.
        check(unsafe { qd_broadcast(self.ptr(), raw(t), root) })
    }

    /// Sum over ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        tch::no_grad(|| {
            if t.is_contiguous() {
                return self.reduce_contiguous(t);
            }
            let tmp = t.f_contiguous()?;
            self.reduce_contiguous(&tmp)?;
            t.shallow_clone().f_copy_(&tmp)?;
            Ok(())
        })
    }

    /// Sum then divide by world size; tensors are flattened into buckets of at most
    /// [`BUCKET_BYTES`] per (device, dtype), one collective per bucket. Floating-point only.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        self.reduce_buckets(tensors, Some(self.world_size as f64))
            .context("all_reduce_mean")
    }

    /// In-place sum over ranks of gradients that are already weighted by each rank's share
    /// of the global batch; bucketed like [`Dist::all_reduce_mean`]. Floating-point only.
    pub fn all_reduce_sum_many(&self, tensors: &[Tensor]) -> Result<()> {
        self.reduce_buckets(tensors, None).context("all_reduce_sum")
    }

    fn reduce_buckets(&self, tensors: &[Tensor], divisor: Option<f64>) -> Result<()> {
        if let Some(t) = tensors.iter().find(|t| !t.is_floating_point()) {
            bail!(
                "gradient reductions need floating-point tensors, got {:?}",
                t.kind()
            );
        }
        self.bucketed(tensors, |flat| {
            self.reduce_contiguous(flat)?;
            if let Some(d) = divisor {
                let _ = flat.shallow_clone().f_div_scalar_(d)?;
            }
            Ok(true)
        })
    }

    /// Copies `root`'s tensors into every rank's (rank 0 broadcasts the initial LoRA/head
    /// weights). Bucketed like [`Dist::all_reduce_mean`]; any dtype.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            bail!(
                "broadcast root {root} is not below world size {}",
                self.world_size
            );
        }
        let is_root = root == self.rank;
        self.bucketed(tensors, |flat| {
            self.broadcast_contiguous(flat, root)?;
            Ok(!is_root)
        })
        .context("broadcast")
    }

    /// Runs `op` on each bucket (a flat contiguous tensor); when `op` returns true the bucket's
    /// contents are copied back into the caller's tensors.
    fn bucketed(
        &self,
        tensors: &[Tensor],
        mut op: impl FnMut(&Tensor) -> Result<bool>,
    ) -> Result<()> {
        tch::no_grad(|| {
            for group in group_by_type(tensors) {
                let sizes: Vec<usize> = group.iter().map(|&(_, b)| b).collect();
                for range in plan_buckets(&sizes, BUCKET_BYTES) {
                    let members: Vec<&Tensor> =
                        group[range].iter().map(|&(i, _)| &tensors[i]).collect();
                    if let [single] = members[..] {
                        if single.is_contiguous() {
                            op(single)?;
                            continue;
                        }
                    }
                    let flats = members
                        .iter()
                        .map(|t| t.f_reshape([-1]))
                        .collect::<Result<Vec<_>, _>>()?;
                    let flat = Tensor::f_cat(&flats, 0)?;
                    if op(&flat)? {
                        let mut offset = 0i64;
                        for t in members {
                            let n = t.numel() as i64;
                            let part = flat.f_narrow(0, offset, n)?.f_reshape(t.size())?;
                            t.shallow_clone().f_copy_(&part)?;
                            offset += n;
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// Every rank's `t` (same shape on every rank), in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        tch::no_grad(|| {
            let input = t.f_contiguous()?;
            let outputs = (0..self.world_size)
                .map(|_| input.f_empty_like())
                .collect::<Result<Vec<_>, _>>()?;
            let ptrs: Vec<*mut c_void> = outputs.iter().map(raw).collect();
            let n = c_int::try_from(ptrs.len()).context("world size does not fit a C int")?;
            // SAFETY: live group and tensors; `ptrs` outlives the call.
            check(unsafe { qd_all_gather(self.ptr(), raw(&input), ptrs.as_ptr(), n) })
                .context("all_gather")?;
            Ok(outputs)
        })
    }

    /// Refuses, on every rank with the same message, a run whose NCCL ranks share a GPU
    /// (NCCL's own error is a cryptic "duplicate GPU" that may name the peer): the ranks'
    /// device UUIDs are gathered over Gloo and compared. Runs with CUDA tensors on Gloo
    /// (`QLORA_DIST_CUDA_BACKEND=gloo`) or on the CPU may share.
    pub fn check_one_gpu_per_rank(&self, device: Device) -> Result<()> {
        let Device::Cuda(index) = device else {
            return Ok(());
        };
        if !nccl_compiled() || std::env::var("QLORA_DIST_CUDA_BACKEND").as_deref() == Ok("gloo") {
            return Ok(());
        }
        let mine = crate::cuda::device_info(index)?;
        let gathered = self
            .all_gather(&Tensor::from_slice(&mine.uuid))
            .context("gathering the ranks' GPU UUIDs")?;
        let uuids = gathered
            .iter()
            .map(|t| {
                let v: Vec<u8> = Vec::try_from(t)?;
                <[u8; 16]>::try_from(v.as_slice()).context("a GPU UUID is not 16 bytes")
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some((a, b)) = shared_gpu(&uuids) {
            let uuid = crate::cuda::DeviceInfo {
                uuid: uuids[a],
                ..mine
            }
            .uuid_string();
            bail!(
                "ranks {a} and {b} would both run NCCL on the GPU {uuid}; NCCL cannot put two \
                 ranks on one GPU. Start at most one rank per GPU (CUDA_VISIBLE_DEVICES, \
                 --nproc), or set QLORA_DIST_CUDA_BACKEND=gloo to run CUDA tensors through \
                 Gloo (slower, but ranks may share a GPU)"
            );
        }
        Ok(())
    }

    /// Waits until every rank has reached the barrier (on Gloo, whatever the device).
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: live group.
        check(unsafe { qd_barrier(self.ptr()) }).context("barrier")
    }
}

impl Drop for Dist {
    fn drop(&mut self) {
        // SAFETY: the group was created by qd_init and is destroyed exactly once.
        unsafe { qd_destroy(self.group.as_ptr()) }
    }
}

/// The first two ranks (in rank order) whose GPU UUIDs are equal.
pub fn shared_gpu(uuids: &[[u8; 16]]) -> Option<(usize, usize)> {
    (0..uuids.len()).find_map(|b| (0..b).find(|&a| uuids[a] == uuids[b]).map(|a| (a, b)))
}

/// The device of the rank with local rank `local_rank` among `local_world` ranks on a node
/// that shows `gpus` CUDA devices, for the `device` setting: `auto` and `cuda` take
/// `cuda:LOCAL_RANK` (torchrun's convention; a node that shows each rank one GPU of its own,
/// as `srun --gpus-per-task=1` does, gives them all `cuda:0`); a fixed `cuda:N` is refused
/// when several ranks share the node, since NCCL cannot run two ranks on one GPU.
pub fn rank_device(
    setting: &str,
    local_rank: usize,
    local_world: usize,
    gpus: usize,
) -> Result<Device> {
    let own_gpu = || -> Result<Device> {
        if local_rank < gpus {
            Ok(Device::Cuda(local_rank))
        } else if gpus == 1 {
            Ok(Device::Cuda(0))
        } else {
            bail!(
                "key `device`: `{setting}` gives LOCAL_RANK {local_rank} the GPU cuda:{local_rank}, \
                 but this node shows {gpus} CUDA device(s); start at most {gpus} ranks per node"
            )
        }
    };
    match setting {
        "cpu" => Ok(Device::Cpu),
        "auto" if gpus == 0 => Ok(Device::Cpu),
        "auto" => own_gpu(),
        "cuda" if gpus == 0 => {
            bail!(
                "key `device`: `cuda` asked for, but {}",
                crate::hardware::no_gpu_reason()
            )
        }
        "cuda" => own_gpu(),
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| {
                    format!("key `device`: `{other}` is not auto, cpu, cuda or cuda:N")
                })?;
            if local_world > 1 {
                bail!(
                    "key `device`: `{other}` would put all {local_world} ranks of this node on one GPU; \
                     use `cuda` or `auto` (each rank then takes cuda:LOCAL_RANK)"
                );
            }
            if n >= gpus {
                let why = if gpus == 0 {
                    crate::hardware::no_gpu_reason().to_string()
                } else {
                    format!("this node shows {gpus} CUDA device(s)")
                };
                bail!("key `device`: `{other}` asked for, but {why}");
            }
            Ok(Device::Cuda(n))
        }
    }
}

/// Contiguous part `rank` of `n` items split into `world` parts of `ceil(n / world)` items;
/// the last parts are shorter or empty when `n` is not a multiple of `world`.
pub fn part_range(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    if world == 0 || rank >= world {
        return 0..0;
    }
    let per = n.div_ceil(world);
    let start = (rank * per).min(n);
    start..(start + per).min(n)
}

/// Evaluation sharding: rank `r` gets examples `r, r + world, ...`, padded to `ceil(n / world)`
/// entries by wrapping around to the first indices (accelerate's `even_batches`), so every
/// rank runs the same number of steps and all-gathers equal shapes. Empty when `n == 0`.
pub fn shard_indices(n: usize, rank: usize, world: usize) -> Vec<usize> {
    if n == 0 || world == 0 || rank >= world {
        return Vec::new();
    }
    let per = n.div_ceil(world);
    (0..per).map(|j| (rank + j * world) % n).collect()
}

/// Inverse of [`shard_indices`] after an all-gather: `gathered[r]` holds rank `r`'s results in
/// shard order. Returns the `n` results in the original order, each example once (the padding
/// duplicates are dropped).
///
/// # Panics
/// When a shard is shorter than [`shard_indices`] makes it (a caller bug, not a data issue).
pub fn unshard<T: Clone>(gathered: Vec<Vec<T>>, n: usize) -> Vec<T> {
    let world = gathered.len();
    if n == 0 || world == 0 {
        return Vec::new();
    }
    (0..n)
        .map(|k| {
            let (r, j) = (k % world, k / world);
            gathered[r].get(j).cloned().unwrap_or_else(|| {
                panic!(
                    "unshard: rank {r} contributed {} results, expected at least {}",
                    gathered[r].len(),
                    j + 1
                )
            })
        })
        .collect()
}

/// [`unshard`] for tensors gathered with [`Dist::all_gather`]: each holds one rank's results
/// along dimension 0; returns the `n` results in the original order.
pub fn unshard_tensors(gathered: &[Tensor], n: usize) -> Result<Tensor> {
    if gathered.is_empty() {
        bail!("unshard_tensors: nothing gathered");
    }
    let first = gathered[0].size();
    let per = *first
        .first()
        .context("unshard_tensors: gathered tensors are scalars")?;
    if (per as usize) * gathered.len() < n {
        bail!(
            "unshard_tensors: {} ranks x {per} results cannot hold {n} examples",
            gathered.len()
        );
    }
    // Shard j of rank r is example r + j*world: stacking on dim 1 interleaves them back.
    let stacked = Tensor::f_stack(gathered, 1)?;
    let mut shape = vec![per * gathered.len() as i64];
    shape.extend_from_slice(&first[1..]);
    Ok(stacked.f_reshape(shape)?.f_narrow(0, 0, n as i64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_gets_its_own_gpu() {
        // torchrun on a 4-GPU node: cuda and auto map rank r to cuda:r.
        for r in 0..4 {
            assert_eq!(rank_device("cuda", r, 4, 4).unwrap(), Device::Cuda(r));
            assert_eq!(rank_device("auto", r, 4, 4).unwrap(), Device::Cuda(r));
        }
        // No GPU: auto is the CPU, cuda is an error naming the key.
        assert_eq!(rank_device("auto", 1, 2, 0).unwrap(), Device::Cpu);
        assert!(format!("{:#}", rank_device("cuda", 0, 2, 0).unwrap_err()).contains("`device`"));
        assert_eq!(rank_device("cpu", 3, 4, 4).unwrap(), Device::Cpu);
        // One visible GPU per rank (srun --gpus-per-task=1): cuda:0 everywhere.
        assert_eq!(rank_device("cuda", 3, 4, 1).unwrap(), Device::Cuda(0));
        // More ranks than GPUs: refused, naming the rank.
        let e = format!("{:#}", rank_device("cuda", 3, 4, 2).unwrap_err());
        assert!(
            e.contains("LOCAL_RANK 3") && e.contains("2 CUDA device"),
            "{e}"
        );
    }

    /// A wait that returns "done" before the collective completed is not taken for success:
    /// the shim waits for completion, reports the work's failure, and times out on a work
    /// that never completes.
    #[test]
    fn collective_waits_check_completion() {
        let ms = Duration::from_millis;
        let t = std::time::Instant::now();
        wait_selftest(ms(150), false, ms(5000)).expect("completes after 150 ms");
        assert!(t.elapsed() >= ms(150), "returned before the work completed");
        let e = wait_selftest(ms(100), true, ms(5000))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("aborted") && e.contains("collective failed"),
            "{e}"
        );
        let t = std::time::Instant::now();
        let e = wait_selftest(ms(60_000), false, ms(200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("(timeout)"), "{e}");
        assert!(t.elapsed() < ms(5000));
    }

    /// NCCL's own watchdog fires after our deadline and last-resort watchdog.
    #[test]
    fn nccl_watchdog_waits_longer_than_ours() {
        for s in [1u64, 10, 300, 3600] {
            let ours = Duration::from_secs(s);
            let period = (ours / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
            let last_resort = ours + period * 4 + Duration::from_secs(5);
            assert!(nccl_watchdog_timeout(ours) > last_resort + Duration::from_secs(10));
        }
    }

    #[test]
    fn a_fixed_gpu_shared_by_local_ranks_is_refused() {
        let e = format!("{:#}", rank_device("cuda:1", 0, 2, 4).unwrap_err());
        assert!(
            e.contains("key `device`") && e.contains("cuda:1") && e.contains("2 ranks"),
            "{e}"
        );
        // One rank per node (multi-node): a fixed GPU is fine.
        assert_eq!(rank_device("cuda:1", 0, 1, 4).unwrap(), Device::Cuda(1));
        assert_eq!(shared_gpu(&[[1; 16], [2; 16], [3; 16]]), None);
        assert_eq!(
            shared_gpu(&[[1; 16], [2; 16], [2; 16], [1; 16]]),
            Some((1, 2))
        );
        let e = format!("{:#}", rank_device("cuda:2", 0, 1, 2).unwrap_err());
        assert!(
            e.contains("`device`") && e.contains("2 CUDA device(s)"),
            "{e}"
        );
        let e = format!("{:#}", rank_device("cuda:0", 0, 1, 0).unwrap_err());
        assert!(
            e.contains("`device`") && e.contains(crate::hardware::no_gpu_reason()),
            "{e}"
        );
        assert!(rank_device("tpu", 0, 1, 4).is_err());
    }
}
