//! Data-parallel communication on libtorch's own c10d: a `TCPStore` rendezvous, Gloo for CPU
//! tensors and NCCL for CUDA tensors, through the C shim in `kernels/dist.cpp`.
//!
//! Ranks are started by `scripts/launch.sh`, torchrun or SLURM; [`Dist::from_env`] reads their
//! variables. Every collective is bounded by the timeout given at start-up, and a failure caused
//! by a peer that died, hung or left names that rank in the error (see `docs/dist.md`).
//!
//! Batch helpers follow accelerate: [`split_batch`] (`split_batches=True`) for training and
//! [`shard_indices`] / [`unshard`] (`even_batches=True`) for evaluation.

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
    let (rank, world_size, local_rank, slurm) = match env_usize("WORLD_SIZE")? {
        Some(w) => {
            let rank = env_usize("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            let local = env_usize("LOCAL_RANK")?;
            (rank, w, local, false)
        }
        None => match env_usize("SLURM_NTASKS")? {
            Some(w) => {
                let rank = env_usize("SLURM_PROCID")?
                    .context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
                (rank, w, env_usize("SLURM_LOCALID")?, true)
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
            Some(e) => Dist::new(
                &e.master_addr,
                e.master_port,
                e.rank,
                e.world_size,
                e.local_rank,
                timeout,
            )
            .map(Some),
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

    /// The device this rank should compute on: `cuda:LOCAL_RANK` when CUDA is available.
    pub fn device(&self) -> Device {
        if tch::Cuda::is_available() {
            Device::Cuda(self.local_rank)
        } else {
            Device::Cpu
        }
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

    /// Sum then divide by world size, for gradients; tensors are flattened into buckets of at
    /// most [`BUCKET_BYTES`] per (device, dtype), one collective per bucket. Floating-point only.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        if let Some(t) = tensors.iter().find(|t| !t.is_floating_point()) {
            bail!(
                "all_reduce_mean needs floating-point tensors, got {:?}",
                t.kind()
            );
        }
        let world = self.world_size as f64;
        self.bucketed(tensors, |flat| {
            self.reduce_contiguous(flat)?;
            let _ = flat.shallow_clone().f_div_scalar_(world)?;
            Ok(true)
        })
        .context("all_reduce_mean")
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

/// Contiguous part `rank` of `n` items split into `world` parts of `ceil(n / world)` items;
/// the last parts are shorter or empty when `n` is not a multiple of `world`.
fn part_range(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    if world == 0 || rank >= world {
        return 0..0;
    }
    let per = n.div_ceil(world);
    let start = (rank * per).min(n);
    start..(start + per).min(n)
}

/// accelerate's `split_batches`: the global batch (indices) split into `world` contiguous parts
/// of `ceil(len / world)`; rank `r` gets part `r`. When the batch does not divide evenly the last
/// parts are shorter, possibly empty (e.g. 5 over 4 ranks: 2, 2, 1, 0). A rank with an empty part
/// must still take part in the gradient all-reduce (with zero gradients); see [`part_weight`] for
/// keeping the average exact.
pub fn split_batch(global: &[usize], rank: usize, world: usize) -> Vec<usize> {
    global[part_range(global.len(), rank, world)].to_vec()
}

/// Weight of rank `rank`'s part of a global batch of `global_len` items: its size / global size
/// (0 for an empty part or batch). The weights of all parts sum to 1. Scaling a rank's
/// part-mean loss by `part_weight * world` before backward makes [`Dist::all_reduce_mean`]
/// yield exactly the gradient of the global-batch mean loss.
pub fn part_weight(global_len: usize, rank: usize, world: usize) -> f64 {
    if global_len == 0 {
        return 0.0;
    }
    part_range(global_len, rank, world).len() as f64 / global_len as f64
}

/// [`split_batch`] together with [`part_weight`].
pub fn split_batch_weighted(global: &[usize], rank: usize, world: usize) -> (Vec<usize>, f64) {
    (
        split_batch(global, rank, world),
        part_weight(global.len(), rank, world),
    )
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
