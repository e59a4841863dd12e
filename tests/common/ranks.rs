//! Processes of one data-parallel run on 127.0.0.1, joined through the torchrun variables.
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

/// A port no one listens on (for the rendezvous store).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `qlora-cls ARGS` as rank `r` of `world`, its output piped.
pub fn rank(args: &[String], r: usize, world: usize, port: u16) -> Child {
    Command::new(super::bin())
        .args(args)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", r.to_string())
        .env("LOCAL_RANK", r.to_string())
        .env("WORLD_SIZE", world.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `qlora-cls ARGS` on `world` ranks (1: one plain process); panics with a failed rank's
/// output.
pub fn run_ranks(args: &[String], world: usize) {
    if world == 1 {
        let out = Command::new(super::bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let port = free_port();
    let ranks: Vec<Child> = (0..world).map(|r| rank(args, r, world, port)).collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "rank {r}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
