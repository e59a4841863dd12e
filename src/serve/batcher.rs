//! Dynamic batching: every handler queues its tokenised inputs; one thread owns the model and
//! runs a forward on whatever is queued, up to `max_batch_tokens` padded tokens and
//! `max_batch_requests` inputs, waiting at most `max_wait_ms` after the oldest input for more.
//! The forward computes each row on its own real tokens (no attention to padding), so an
//! input's logits do not depend on its batch mates beyond float rounding.
use super::api::ApiError;
use super::metrics::Metrics;
use crate::data::batch::{collate, Encoded};
use crate::model::classifier::LlamaClassifier;
use axum::http::StatusCode;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

/// One input's logits, or why the forward failed.
pub type Answer = Result<Vec<f64>, String>;

struct Item {
    ids: Vec<i64>,
    arrived: Instant,
    reply: oneshot::Sender<Answer>,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_wait: Duration,
    /// Inputs queued or in a forward beyond which requests get 429.
    pub max_queue: usize,
}

pub struct Batcher {
    tx: Mutex<Option<mpsc::Sender<Item>>>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Batcher {
    pub fn start(
        model: LlamaClassifier,
        device: Device,
        pad_id: i64,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Item>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let worker = std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || {
                let _g = tch::no_grad_guard();
                // This thread runs every forward: it computes on the model's device (set
                // once here; the kernels never switch).
                if let Err(e) = crate::cuda::set_device(device) {
                    eprintln!("serve: {e:#}");
                }
                let mut pending: Option<Item> = None;
                loop {
                    let first = match pending.take() {
                        Some(i) => i,
                        None => match rx.recv() {
                            Ok(i) => i,
                            Err(_) => break,
                        },
                    };
                    let deadline = first.arrived + limits.max_wait;
                    let mut longest = first.ids.len();
                    let mut batch = vec![first];
                    while batch.len() < limits.max_batch_requests {
                        let now = Instant::now();
                        let next = if now >= deadline {
                            rx.try_recv().ok()
                        } else {
                            // A timeout or a closed queue ends the batch alike.
                            rx.recv_timeout(deadline - now).ok()
                        };
                        let Some(next) = next else { break };
                        let l = longest.max(next.ids.len());
                        if l * (batch.len() + 1) > limits.max_batch_tokens {
                            pending = Some(next);
                            break;
                        }
                        longest = l;
                        batch.push(next);
                    }
                    run(&model, device, pad_id, batch, longest, &metrics, &q);
                }
            })
            .expect("spawn the forward thread");
        Batcher {
            tx: Mutex::new(Some(tx)),
            queued,
            max_queue: limits.max_queue,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Inputs queued or in a forward now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues the inputs of one request (all or none); their answers arrive in order.
    pub fn submit(
        &self,
        inputs: Vec<Vec<i64>>,
    ) -> Result<Vec<oneshot::Receiver<Answer>>, ApiError> {
        let n = inputs.len();
        let mut cur = self.queued.load(Ordering::SeqCst);
        loop {
            if cur + n > self.max_queue {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Overloaded",
                    format!(
                        "the queue holds {cur} inputs and takes at most {}; retry later",
                        self.max_queue
                    ),
                ));
            }
            match self
                .queued
                .compare_exchange(cur, cur + n, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unhealthy",
                "the server is shutting down",
            ));
        };
        let now = Instant::now();
        let mut out = Vec::with_capacity(n);
        for ids in inputs {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(Item {
                    ids,
                    arrived: now,
                    reply,
                })
                .is_err()
            {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Backend",
                    "the forward thread has stopped",
                ));
            }
            out.push(rx);
        }
        Ok(out)
    }

    /// Stops taking inputs, lets the forward thread finish what is queued, and joins it.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn run(
    model: &LlamaClassifier,
    device: Device,
    pad_id: i64,
    batch: Vec<Item>,
    longest: usize,
    metrics: &Metrics,
    queued: &AtomicUsize,
) {
    let start = Instant::now();
    let waited: Vec<f64> = batch
        .iter()
        .map(|i| (start - i.arrived).as_secs_f64())
        .collect();
    metrics.batch(batch.len(), longest * batch.len(), &waited);
    let enc: Vec<Encoded> = batch
        .iter()
        .map(|i| Encoded {
            ids: i.ids.clone(),
            label: None,
            idx: 0,
            window: 0,
            rejected: None,
        })
        .collect();
    // A libtorch error panics inside tch; it fails this batch, not the server.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<Vec<Vec<f64>>> {
        let b = collate(&enc.iter().collect::<Vec<_>>(), pad_id);
        let logits = model.logits(
            &b.input_ids.to_device(device),
            &b.attention_mask.to_device(device),
        )?;
        let rows: Vec<Vec<f64>> =
            Vec::try_from(&logits.to_kind(Kind::Double).to_device(Device::Cpu))?;
        Ok(rows)
    }));
    let result = match result {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(format!("the forward failed: {e:#}")),
        Err(p) => Err(format!(
            "the forward failed: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    };
    // The batch leaves the queue before its answers go out: a client that sends its next
    // request on receiving one must find the room it left.
    queued.fetch_sub(batch.len(), Ordering::SeqCst);
    match result {
        Ok(rows) => {
            for (item, row) in batch.into_iter().zip(rows) {
                let _ = item.reply.send(Ok(row));
            }
        }
        Err(e) => {
            for item in batch {
                let _ = item.reply.send(Err(e.clone()));
            }
        }
    }
}

/// The logits of one row as a tensor `[1, labels]`.
pub fn row_tensor(row: &[f64]) -> Tensor {
    Tensor::from_slice(row).view([1, -1])
}
