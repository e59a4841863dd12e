//! `qlora-cls serve` started on 127.0.0.1 (an OS-chosen port) and called over real HTTP.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// `qlora-cls serve --host 127.0.0.1 --port 0 <args>`, once it says where it listens.
    pub fn serve(args: &[&str]) -> Server {
        let mut child = Command::new(super::bin())
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qlora-cls serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .expect("read stdout");
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.to_string();
            }
        };
        // Keep reading stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(&self.addr, method, path, body).expect("HTTP exchange")
    }

    pub fn predict(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.call("POST", "/predict", &body.to_string());
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("/predict answered non-JSON ({e}): {text}"));
        (status, v)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}
