//! Data-parallel communication: `src/dist.rs`, `kernels/dist.cpp`, `scripts/launch.sh`.
//!
//! Multi-rank tests re-execute this test binary: a parent test starts
//! `current_exe() --exact rank_<name> --nocapture` once per rank (directly or through
//! scripts/launch.sh) with the launcher variables set on loopback. The `rank_*` tests do their
//! part only in such a child (`QLORA_DIST_CHILD=1`) and return at once otherwise.
mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qlora_cls::dist::{self, Dist};
use qlora_cls::train;
use tch::{Device, Kind, Tensor};

const CHILD: &str = "QLORA_DIST_CHILD";
const TIMEOUT_VAR: &str = "QLORA_DIST_TEST_TIMEOUT_S";

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn launcher() -> PathBuf {
    common::root().join("scripts").join("launch.sh")
}

/// This test binary, running only `test`, as a rank child.
fn rank_command(test: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current exe"));
    c.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    for v in ["SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"] {
        c.env_remove(v);
    }
    c
}

fn with_rank_env(c: &mut Command, rank: usize, world: usize, port: u16) -> &mut Command {
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
}

/// Waits for `child` until `deadline`; kills it and returns None past the deadline.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `c` with stdout/stderr captured in files under `dir`; panics past `limit`.
fn run_captured(
    c: &mut Command,
    dir: &Path,
    tag: &str,
    limit: Duration,
) -> (ExitStatus, String, Duration) {
    let out = dir.join(format!("{tag}.out"));
    let err = dir.join(format!("{tag}.err"));
    let t0 = Instant::now();
    let mut child = c
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let status = wait_until(&mut child, t0 + limit);
    let text = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let status = status.unwrap_or_else(|| panic!("{tag} did not finish within {limit:?}\n{text}"));
    (status, text, t0.elapsed())
}

fn pid_alive(pid: u32) -> bool {
    // A zombie has exited already; only a running or sleeping process counts.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn farange(n: i64) -> Tensor {
    Tensor::arange(n, (Kind::Float, Device::Cpu))
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff == 0.0, "{what}: max abs difference {diff}");
}

// ---------------------------------------------------------------------------------------------
// Two Gloo ranks through scripts/launch.sh.

#[test]
fn gloo_two_ranks_collectives() {
    let dir = common::tempdir();
    let mut c = Command::new("bash");
    c.arg(launcher())
        .args(["--nproc", "2", "--"])
        .arg(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "rank_collectives",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1");
    let (status, text, elapsed) =
        run_captured(&mut c, dir.path(), "launch", Duration::from_secs(180));
    println!("2 Gloo ranks finished in {elapsed:.1?}\n{text}");
    assert!(status.success(), "ranks failed: {status}\n{text}");
    for r in 0..2 {
        assert!(
            text.contains(&format!("rank {r}: all collectives checked")),
            "rank {r} did not run its checks\n{text}"
        );
    }
}

#[test]
fn rank_collectives() {
    if !is_child() {
        return;
    }
    let d = Dist::from_env(Duration::from_secs(60))
        .expect("join")
        .expect("launcher variables are set");
    let (r, w) = (d.rank, d.world_size);
    assert_eq!(w, 2);
    let rf = r as f64;
    let wf = w as f64;
    // Closed forms over ranks 0..w of the per-rank inputs below.
    let sum_r1: f64 = (1..=w).map(|k| k as f64).sum(); // sum of (r + 1)
    let sum_r: f64 = (0..w).map(|k| k as f64).sum();

    // all_reduce_sum, several sizes plus a non-contiguous view: a*(r+1) + r summed.
    for n in [1i64, 7, 1000, 300_001] {
        let a = farange(n).fmod(1000);
        let t = &a * (rf + 1.0) + rf;
        d.all_reduce_sum(&t).expect("all_reduce_sum");
        assert_same(&t, &(&a * sum_r1 + sum_r), &format!("all_reduce_sum n={n}"));
    }
    let base = farange(15).view([3, 5]) * (rf + 1.0);
    let view = base.tr();
    assert!(!view.is_contiguous());
    d.all_reduce_sum(&view).expect("all_reduce_sum on a view");
    assert_same(
        &view,
        &(farange(15).view([3, 5]) * sum_r1).tr(),
        "all_reduce_sum on a transposed view",
    );

    // all_reduce_mean over several buckets (two float groups, a tensor bigger than a bucket).
    let sizes: [i64; 5] = [4 << 20, 4 << 20, 7 << 20, 10, 12];
    let mut grads: Vec<Tensor> = sizes
        .iter()
        .map(|&n| farange(n).fmod(1000) * (rf + 1.0))
        .collect();
    grads[4] = grads[4].view([3, 4]).tr(); // non-contiguous member of a shared bucket
    grads.push(Tensor::arange(5, (Kind::Double, Device::Cpu)) * (rf + 1.0));
    let f32_bytes: Vec<usize> = grads[..5].iter().map(|t| t.numel() * 4).collect();
    let want_buckets = dist::plan_buckets(&f32_bytes, dist::BUCKET_BYTES).len()
        + dist::plan_buckets(&[5 * 8], dist::BUCKET_BYTES).len();
    assert!(want_buckets >= 4, "the test should span several buckets");
    let before = d.collectives_started();
    d.all_reduce_mean(&grads).expect("all_reduce_mean");
    assert_eq!(
        (d.collectives_started() - before) as usize,
        want_buckets,
        "one collective per bucket"
    );
    let mean = sum_r1 / wf;
    for (i, &n) in sizes.iter().enumerate() {
        let mut want = farange(n).fmod(1000) * mean;
        if i == 4 {
            want = want.view([3, 4]).tr();
        }
        assert_same(
            &grads[i],
            &want,
            &format!("all_reduce_mean tensor {i} ({n} floats)"),
        );
    }
    assert_same(
        &grads[5],
        &(Tensor::arange(5, (Kind::Double, Device::Cpu)) * mean),
        "all_reduce_mean f64 tensor",
    );

    // broadcast from rank 1: floats of several sizes (one over a bucket) and an int64 tensor.
    let root = 1usize;
    let make = |rank: f64| -> Vec<Tensor> {
        vec![
            farange(3) + rank * 10.0,
            farange(7 << 20).fmod(997) + rank,
            Tensor::arange(4, (Kind::Int64, Device::Cpu)) * (rank as i64 + 2),
            farange(6).view([2, 3]).tr() - rank,
        ]
    };
    let mine = make(rf);
    d.broadcast(&mine, root).expect("broadcast");
    for (i, (got, want)) in mine.iter().zip(make(root as f64).iter()).enumerate() {
        assert_eq!(got.kind(), want.kind());
        assert_same(got, want, &format!("broadcast tensor {i}"));
    }

    // all_gather.
    let t = farange(6).view([2, 3]) + 100.0 * rf;
    let gathered = d.all_gather(&t).expect("all_gather");
    assert_eq!(gathered.len(), w);
    for (k, g) in gathered.iter().enumerate() {
        assert_same(
            g,
            &(farange(6).view([2, 3]) + 100.0 * k as f64),
            &format!("all_gather part {k}"),
        );
    }

    // barrier: rank 1 arrives 700 ms late; rank 0 must wait for it.
    d.barrier().expect("aligning barrier");
    if r == 1 {
        std::thread::sleep(Duration::from_millis(700));
    }
    let t0 = Instant::now();
    d.barrier().expect("barrier");
    if r == 0 {
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(500),
            "barrier returned after {waited:?}"
        );
    }

    // Evaluation sharding end to end: 7 examples over 2 ranks, padded, gathered, unsharded.
    let n = 7;
    let shard = dist::shard_indices(n, r, w);
    let preds = Tensor::from_slice(&shard.iter().map(|&i| i as f32 * 10.0).collect::<Vec<_>>());
    let gathered = d.all_gather(&preds).expect("all_gather predictions");
    let per_rank: Vec<Vec<f32>> = gathered
        .iter()
        .map(|g| Vec::<f32>::try_from(g).expect("to vec"))
        .collect();
    let want: Vec<f32> = (0..n).map(|i| i as f32 * 10.0).collect();
    assert_eq!(dist::unshard(per_rank, n), want, "unshard");
    let flat = dist::unshard_tensors(&gathered, n).expect("unshard_tensors");
    assert_eq!(
        Vec::<f32>::try_from(&flat).expect("to vec"),
        want,
        "unshard_tensors"
    );

    d.barrier().expect("final barrier");
    println!("rank {r}: all collectives checked");
}

// ---------------------------------------------------------------------------------------------
// A rank killed with SIGKILL mid-run: the other exits non-zero within the timeout, naming it.

/// Starts 2 `rank_until_killed` ranks, waits until `victim` has done 20 collectives, sends it
/// `signal` and returns the survivor's exit status, its output and the time it took to exit.
fn interrupt_rank(victim: usize, signal: &str, timeout_s: u64) -> (ExitStatus, String, Duration) {
    let survivor = 1 - victim;
    let dir = common::tempdir();
    let port = free_port();
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut victim_lines = None;
    for rank in 0..2 {
        let mut c = rank_command("rank_until_killed");
        with_rank_env(&mut c, rank, 2, port).env(TIMEOUT_VAR, timeout_s.to_string());
        c.stdin(Stdio::null());
        if rank == victim {
            c.stdout(Stdio::piped()).stderr(Stdio::null());
        } else {
            c.stdout(File::create(dir.path().join("survivor.out")).expect("file"))
                .stderr(File::create(dir.path().join("survivor.err")).expect("file"));
        }
        let mut child = c.spawn().expect("spawn rank");
        if rank == victim {
            let out = child.stdout.take().expect("piped stdout");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            victim_lines = Some(rx);
        }
        children.push(Some(child));
    }
    let rx = victim_lines.expect("victim output");
    // Interrupt once the victim is well into its sequence of collectives.
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        let left = ready_by.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("collectives done: 20") => break,
            Ok(_) => {}
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!("rank {victim} never reached 20 collectives: {e}");
            }
        }
    }
    let mut v = children[victim].take().expect("victim");
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &v.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{signal} failed");
    let hit_at = Instant::now();
    let mut s = children[survivor].take().expect("survivor");
    let status = wait_until(&mut s, hit_at + Duration::from_secs(timeout_s + 30));
    let elapsed = hit_at.elapsed();
    let _ = v.kill(); // SIGKILL also ends a stopped process
    let _ = v.wait();
    let text = format!(
        "{}\n{}",
        std::fs::read_to_string(dir.path().join("survivor.out")).unwrap_or_default(),
        std::fs::read_to_string(dir.path().join("survivor.err")).unwrap_or_default()
    );
    let status = status.unwrap_or_else(|| {
        panic!("rank {survivor} hung after rank {victim} got SIG{signal}\n{text}")
    });
    let reason: String = text
        .lines()
        .filter(|l| l.contains("stopped:"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("SIG{signal} to rank {victim}: rank {survivor} exited ({status}) {elapsed:.1?} later: {reason}");
    (status, text, elapsed)
}

#[test]
fn killed_rank_is_named_within_timeout() {
    const TIMEOUT_S: u64 = 10;
    // Rank 1, then rank 0 (which also hosts the TCPStore).
    for victim in [1usize, 0] {
        let survivor = 1 - victim;
        let (status, text, elapsed) = interrupt_rank(victim, "KILL", TIMEOUT_S);
        assert!(!status.success(), "rank {survivor} should fail\n{text}");
        assert!(
            elapsed < Duration::from_secs(TIMEOUT_S),
            "rank {survivor} took {elapsed:?} (timeout {TIMEOUT_S} s)\n{text}"
        );
        assert!(
            text.contains(&format!("lost rank {victim}")),
            "rank {survivor}'s error does not name rank {victim}\n{text}"
        );
    }
}

#[test]
fn hung_rank_is_named_after_the_timeout() {
    // SIGSTOP: the peer keeps its sockets open but never answers, so only the timeout can
    // end the collective; the survivor must then name it and exit instead of hanging.
    const TIMEOUT_S: u64 = 5;
    let (status, text, elapsed) = interrupt_rank(1, "STOP", TIMEOUT_S);
    assert!(!status.success(), "rank 0 should fail\n{text}");
    assert!(
        elapsed < Duration::from_secs(TIMEOUT_S + 5),
        "rank 0 took {elapsed:?} (timeout {TIMEOUT_S} s)\n{text}"
    );
    assert!(
        text.contains("lost rank 1"),
        "rank 0's error does not name rank 1\n{text}"
    );
}

#[test]
fn rank_until_killed() {
    if !is_child() {
        return;
    }
    let secs: u64 = std::env::var(TIMEOUT_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let d = Dist::from_env(Duration::from_secs(secs))
        .expect("join")
        .expect("launcher variables are set");
    let t = farange(1000);
    let run = || -> anyhow::Result<()> {
        for i in 1..=3000 {
            d.all_reduce_sum(&t)?;
            if i % 5 == 0 {
                d.all_gather(&t)?;
                d.barrier()?;
            }
            println!("collectives done: {i}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    };
    if let Err(e) = run() {
        // The failure path the training loop takes: the error propagates and the process fails.
        panic!("rank {} stopped: {e:#}", d.rank);
    }
    panic!("rank {} was never interrupted", d.rank);
}

// ---------------------------------------------------------------------------------------------
// scripts/launch.sh

#[test]
fn launcher_stops_all_ranks_when_one_fails() {
    let dir = common::tempdir();
    let mut c = Command::new("bash");
    c.arg(launcher())
        .args(["--nproc", "3", "--grace", "5", "--"])
        .args([
            "bash",
            "-c",
            r#"echo $$ > "$PIDS/pid.$RANK"; if [ "$RANK" = 1 ]; then sleep 0.5; exit 1; fi; sleep 30"#,
        ])
        .env("PIDS", dir.path());
    let (status, text, elapsed) =
        run_captured(&mut c, dir.path(), "launch", Duration::from_secs(60));
    println!("launcher exited with {status} after {elapsed:.1?}\n{text}");
    assert_eq!(
        status.code(),
        Some(1),
        "exit status of the failed rank\n{text}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(text.contains("rank 1 was the first to fail"), "{text}");
    for r in [0, 2] {
        let pid: u32 = std::fs::read_to_string(dir.path().join(format!("pid.{r}")))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        assert!(!pid_alive(pid), "rank {r} (pid {pid}) still runs");
    }
}

#[test]
fn launcher_success_sets_environment() {
    let dir = common::tempdir();
    let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT" > "$OUT/env.$RANK""#;
    // Single node, default address and a free port.
    let mut c = Command::new("bash");
    c.arg(launcher())
        .args(["--nproc", "3", "--", "bash", "-c", script])
        .env("OUT", dir.path());
    let (status, text, _) = run_captured(&mut c, dir.path(), "single", Duration::from_secs(60));
    assert!(status.success(), "{text}");
    let mut ports = Vec::new();
    for r in 0..3 {
        let line = std::fs::read_to_string(dir.path().join(format!("env.{r}"))).expect("env file");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            f[..5],
            [
                r.to_string().as_str(),
                "3",
                r.to_string().as_str(),
                "3",
                "127.0.0.1"
            ],
            "{line}"
        );
        ports.push(f[5].parse::<u16>().expect("MASTER_PORT is a port"));
    }
    assert!(ports.iter().all(|&p| p == ports[0] && p > 0), "{ports:?}");

    // Second node of two: global ranks 2 and 3.
    let dir2 = common::tempdir();
    let mut c = Command::new("bash");
    c.arg(launcher())
        .args(["--nproc", "2", "--nnodes", "2", "--node-rank", "1"])
        .args(["--master-addr", "127.0.0.2", "--master-port", "29999"])
        .args(["--", "bash", "-c", script])
        .env("OUT", dir2.path());
    let (status, text, _) = run_captured(&mut c, dir2.path(), "multi", Duration::from_secs(60));
    assert!(status.success(), "{text}");
    for (local, global) in [(0, 2), (1, 3)] {
        let line =
            std::fs::read_to_string(dir2.path().join(format!("env.{global}"))).expect("env file");
        let want = format!("{global} 4 {local} 2 127.0.0.2 29999");
        assert_eq!(line.trim(), want);
    }
    // Errors in the arguments are refused before anything starts.
    let (status, text, _) = run_captured(
        Command::new("bash")
            .arg(launcher())
            .args(["--nproc", "2", "--nnodes", "2", "--", "true"]),
        dir2.path(),
        "bad",
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("--master-addr is required"), "{text}");
}

#[test]
fn launcher_forwards_sigterm() {
    let dir = common::tempdir();
    let mut child = Command::new("bash")
        .arg(launcher())
        .args(["--nproc", "2", "--grace", "5", "--"])
        .args([
            "bash",
            "-c",
            r#"trap 'echo term > "$OUT/term.$RANK"; exit 0' TERM; echo up > "$OUT/up.$RANK"; sleep 30 & wait"#,
        ])
        .env("OUT", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn launcher");
    let up_by = Instant::now() + Duration::from_secs(30);
    while !(0..2).all(|r| dir.path().join(format!("up.{r}")).exists()) {
        assert!(Instant::now() < up_by, "ranks did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = wait_until(&mut child, t0 + Duration::from_secs(30)).expect("launcher exits");
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    for r in 0..2 {
        let got = std::fs::read_to_string(dir.path().join(format!("term.{r}"))).unwrap_or_default();
        assert_eq!(got.trim(), "term", "rank {r} did not get SIGTERM");
    }
}

// ---------------------------------------------------------------------------------------------
// NCCL: one rank on the first GPU.

#[test]
fn nccl_one_rank() {
    if !tch::Cuda::is_available() {
        println!(
            "skipping nccl_one_rank: no CUDA device (NCCL support compiled: {})",
            dist::nccl_compiled()
        );
        return;
    }
    assert!(
        dist::nccl_compiled(),
        "CUDA is available but the shim was built without NCCL"
    );
    let d = Dist::new("127.0.0.1", free_port(), 0, 1, 0, Duration::from_secs(120)).expect("join");
    let dev = Device::Cuda(0);
    let a = Tensor::arange(1000, (Kind::Float, dev));
    let t = a.copy();
    d.all_reduce_sum(&t).expect("nccl all_reduce_sum");
    assert_same(
        &t.to_device(Device::Cpu),
        &a.to_device(Device::Cpu),
        "all_reduce_sum over 1 rank",
    );
    let grads = vec![a.copy(), Tensor::ones([3, 4], (Kind::BFloat16, dev)).tr()];
    d.all_reduce_mean(&grads).expect("nccl all_reduce_mean");
    assert_same(
        &grads[0].to_device(Device::Cpu),
        &a.to_device(Device::Cpu),
        "all_reduce_mean",
    );
    d.broadcast(&grads, 0).expect("nccl broadcast");
    let g = d.all_gather(&a).expect("nccl all_gather");
    assert_eq!(g.len(), 1);
    assert_same(
        &g[0].to_device(Device::Cpu),
        &a.to_device(Device::Cpu),
        "all_gather",
    );
    d.barrier().expect("barrier");
}

// ---------------------------------------------------------------------------------------------
// Batch splitting and evaluation sharding (pure functions).

/// accelerate's BatchSamplerShard, the reference for both helpers.
fn accelerate_shards(cases: &[(usize, usize, usize, bool)]) -> Vec<Vec<usize>> {
    let dir = common::tempdir();
    let cases_json: Vec<String> = cases
        .iter()
        .map(|&(n, bs, w, split)| {
            format!("[{n},{bs},{w},{}]", if split { "true" } else { "false" })
        })
        .collect();
    let input = dir.path().join("cases.json");
    std::fs::write(&input, format!("[{}]", cases_json.join(","))).expect("write cases");
    let script = r#"
import json, sys
from torch.utils.data import BatchSampler, SequentialSampler
from accelerate.data_loader import BatchSamplerShard
out = []
for n, bs, w, split in json.load(open(sys.argv[1])):
    for r in range(w):
        bsampler = BatchSampler(SequentialSampler(range(n)), batch_size=bs, drop_last=False)
        shard = BatchSamplerShard(bsampler, num_processes=w, process_index=r,
                                  split_batches=split, even_batches=True)
        batches = list(shard)
        out.append(batches[0] if split else [i for b in batches for i in b])
json.dump(out, open(sys.argv[2], "w"))
"#;
    let output = dir.path().join("out.json");
    let res = Command::new(common::python())
        .args(["-c", script])
        .arg(&input)
        .arg(&output)
        .output()
        .expect("run the accelerate oracle");
    assert!(
        res.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&output).expect("oracle output")).expect("json")
}

#[test]
fn shard_indices_match_accelerate_even_batches() {
    // (n examples, batch 1, world, no split): accelerate pads by wrapping to the first indices.
    let cases: Vec<(usize, usize, usize, bool)> =
        [(7, 2), (8, 2), (10, 4), (3, 4), (1, 3), (13, 5), (2, 8)]
            .iter()
            .map(|&(n, w)| (n, 1, w, false))
            .collect();
    let want = accelerate_shards(&cases);
    let mut k = 0;
    for &(n, _, w, _) in &cases {
        let mut gathered = Vec::new();
        for r in 0..w {
            let got = dist::shard_indices(n, r, w);
            assert_eq!(got, want[k], "shard_indices({n}, {r}, {w})");
            k += 1;
            gathered.push(got);
        }
        // Every example once, in order, after dropping the padding.
        assert_eq!(
            dist::unshard(gathered, n),
            (0..n).collect::<Vec<_>>(),
            "unshard n={n} w={w}"
        );
    }
    assert!(dist::shard_indices(0, 0, 2).is_empty());
    assert!(dist::unshard(vec![Vec::<usize>::new(); 2], 0).is_empty());
}

/// Rank `r`'s part of a global batch as training takes it (one micro-step): its items and
/// its loss weight (an empty part has none and weighs 0).
fn parts(global: &[usize], r: usize, w: usize) -> (Vec<usize>, f64) {
    match train::micro_batches(global, r, w, 1).as_slice() {
        [] => (Vec::new(), 0.0),
        [m] => (m.items.clone(), m.part.loss_weight),
        more => panic!("{} micro-batches for one accumulation step", more.len()),
    }
}

#[test]
fn split_batch_matches_accelerate_and_keeps_the_average_exact() {
    // Divisible global batches: identical to accelerate's split_batches=True.
    let cases: Vec<(usize, usize, usize, bool)> =
        vec![(8, 8, 2, true), (12, 12, 4, true), (6, 6, 3, true)];
    let want = accelerate_shards(&cases);
    let mut k = 0;
    for &(n, _, w, _) in &cases {
        let global: Vec<usize> = (0..n).collect();
        for r in 0..w {
            assert_eq!(
                parts(&global, r, w).0,
                want[k],
                "split_batch n={n} r={r} w={w}"
            );
            k += 1;
        }
    }
    // Uneven batches (accelerate refuses them): contiguous parts of ceil(n/w), the last ones
    // shorter or empty; the weights make the mean of the per-rank means exact.
    let values: Vec<f64> = (0..23).map(|i| ((i * 37 % 11) as f64).sin()).collect();
    for n in [0usize, 1, 2, 5, 7, 9, 23] {
        for w in [1usize, 2, 3, 4, 8] {
            let global: Vec<usize> = (100..100 + n).collect();
            let per = n.div_ceil(w);
            let mut joined = Vec::new();
            let mut weight_sum = 0.0;
            let mut mean_of_parts = 0.0;
            for r in 0..w {
                let (part, weight) = parts(&global, r, w);
                assert!(part.len() <= per);
                if r > 0 && !part.is_empty() {
                    assert_eq!(
                        parts(&global, r - 1, w).0.len(),
                        per,
                        "only the tail is short"
                    );
                }
                assert!((weight - part.len() as f64 / n.max(1) as f64).abs() < 1e-15);
                weight_sum += weight;
                if !part.is_empty() {
                    let part_mean =
                        part.iter().map(|&i| values[i - 100]).sum::<f64>() / part.len() as f64;
                    // What a rank backpropagates: its part mean scaled by its weight; the
                    // all-reduce sums the ranks.
                    mean_of_parts += part_mean * weight;
                }
                joined.extend(part);
            }
            assert_eq!(
                joined, global,
                "parts cover the batch in order (n={n}, w={w})"
            );
            if n > 0 {
                let global_mean = values[..n].iter().sum::<f64>() / n as f64;
                assert!((weight_sum - 1.0).abs() < 1e-12, "weights sum to 1");
                assert!((mean_of_parts - global_mean).abs() < 1e-12, "n={n} w={w}");
            }
        }
    }
}

#[test]
fn bucket_plan_is_greedy_and_capped() {
    let cap = 100;
    let sizes_list: Vec<Vec<usize>> = vec![
        vec![],
        vec![10],
        vec![250],
        vec![40, 40, 40, 40],
        vec![100, 1, 100],
        vec![30, 250, 30, 30, 50, 99],
    ];
    for sizes in sizes_list {
        let plan = dist::plan_buckets(&sizes, cap);
        let covered: Vec<usize> = plan.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..sizes.len()).collect::<Vec<_>>(), "{sizes:?}");
        for (b, range) in plan.iter().enumerate() {
            let bytes: usize = sizes[range.clone()].iter().sum();
            assert!(
                range.len() == 1 || bytes <= cap,
                "bucket {range:?} of {sizes:?} over the cap"
            );
            if let Some(next) = plan.get(b + 1) {
                assert!(
                    bytes + sizes[next.start] > cap,
                    "buckets {b} and {} could merge: {sizes:?}",
                    b + 1
                );
            }
        }
    }
}

#[test]
fn from_env_without_launcher_is_single_process() {
    // The test process itself was not started by a launcher (the rank children are, but they
    // do not run this test).
    if std::env::var_os("WORLD_SIZE").is_some() || std::env::var_os("SLURM_NTASKS").is_some() {
        println!("skipping: launcher variables present in the test environment");
        return;
    }
    assert!(Dist::from_env(Duration::from_secs(1))
        .expect("no error")
        .is_none());
}

#[test]
fn from_env_reads_torchrun_and_slurm_variables() {
    let dir = common::tempdir();
    // WORLD_SIZE=1: single process, no group.
    let mut c = rank_command("rank_env_check");
    with_rank_env(&mut c, 0, 1, free_port()).env("EXPECT", "none");
    let (status, text, _) = run_captured(&mut c, dir.path(), "world1", Duration::from_secs(60));
    assert!(
        status.success() && text.contains("env check passed"),
        "{text}"
    );

    // SLURM variables only (no torchrun ones): a real 2-rank group.
    let port = free_port();
    let mut kids = Vec::new();
    for rank in 0..2usize {
        let mut c = rank_command("rank_env_check");
        c.env("SLURM_NTASKS", "2")
            .env("SLURM_PROCID", rank.to_string())
            .env("SLURM_LOCALID", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("LOCAL_RANK")
            .env("EXPECT", format!("join {rank} 2"))
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join(format!("slurm{rank}.out"))).expect("file"))
            .stderr(File::create(dir.path().join(format!("slurm{rank}.err"))).expect("file"));
        kids.push(c.spawn().expect("spawn"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (rank, mut k) in kids.into_iter().enumerate() {
        let status = wait_until(&mut k, deadline);
        let text = format!(
            "{}\n{}",
            std::fs::read_to_string(dir.path().join(format!("slurm{rank}.out")))
                .unwrap_or_default(),
            std::fs::read_to_string(dir.path().join(format!("slurm{rank}.err")))
                .unwrap_or_default()
        );
        assert!(
            status.is_some_and(|s| s.success()) && text.contains("env check passed"),
            "SLURM rank {rank}: {status:?}\n{text}"
        );
    }

    // A rank that never shows up is named once the rendezvous times out.
    let mut c = rank_command("rank_env_check");
    with_rank_env(&mut c, 0, 2, free_port())
        .env(TIMEOUT_VAR, "2")
        .env("EXPECT", "error rank(s)+1+never+joined");
    let (status, text, elapsed) =
        run_captured(&mut c, dir.path(), "missing", Duration::from_secs(60));
    assert!(
        status.success() && text.contains("env check passed"),
        "{text}"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "rendezvous took {elapsed:?}"
    );

    // SLURM without MASTER_ADDR is refused with a hint.
    let mut c = rank_command("rank_env_check");
    c.env("SLURM_NTASKS", "2")
        .env("SLURM_PROCID", "0")
        .env_remove("MASTER_ADDR")
        .env_remove("WORLD_SIZE")
        .env("EXPECT", "error MASTER_ADDR");
    let (status, text, _) = run_captured(&mut c, dir.path(), "nomaster", Duration::from_secs(60));
    assert!(
        status.success() && text.contains("env check passed"),
        "{text}"
    );
}

#[test]
fn rank_env_check() {
    if !is_child() {
        return;
    }
    let expect = std::env::var("EXPECT").expect("EXPECT");
    let secs: u64 = std::env::var(TIMEOUT_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let res = Dist::from_env(Duration::from_secs(secs));
    let words: Vec<&str> = expect.split_whitespace().collect();
    match words[..] {
        ["none"] => assert!(res.expect("no error").is_none()),
        ["error", needle] => {
            let e = format!("{:#}", res.err().expect("an error"));
            assert!(e.contains(&needle.replace('+', " ")), "{e}");
            println!("expected error: {e}");
        }
        ["join", rank, world] => {
            let d = res.expect("join").expect("a group");
            assert_eq!(d.rank.to_string(), rank);
            assert_eq!(d.world_size.to_string(), world);
            assert_eq!(d.local_rank, d.rank, "SLURM_LOCALID");
            let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
            d.all_reduce_sum(&t).expect("all_reduce_sum");
            assert_same(
                &t,
                &(Tensor::ones([4], (Kind::Float, Device::Cpu)) * 2.0),
                "sum of ones",
            );
            d.barrier().expect("barrier");
        }
        _ => panic!("bad EXPECT {expect:?}"),
    }
    println!("env check passed");
}
