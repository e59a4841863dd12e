// c10d shim: TCPStore rendezvous + ProcessGroupGloo (CPU) + ProcessGroupNCCL (CUDA) behind a
// C ABI (dist.h). Every entry point catches everything: no C++ exception crosses the ABI.
//
// Lost-peer diagnosis: besides the process groups, every rank runs a heartbeat thread with
// its own TCPStore client that writes "hb/<rank>" = "<beat> <collective seq> <state>" every
// `period` and reads everyone else's. When a collective fails or times out, the ranks whose
// beat stopped advancing (died or hung), that announced a clean exit, or that never reached
// the failing collective are named in the error. A watchdog thread ends the process if a
// collective (including this diagnosis) is stuck well past the timeout, so nothing hangs.

// The c10d backend headers are guarded by these; the torch wheel is built with both.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#if __has_include(<nccl.h>) && __has_include(<cuda_runtime_api.h>)
#define QD_HAVE_NCCL 1
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#else
#define QD_HAVE_NCCL 0
#endif

#include "dist.h"

// The torch headers trip -Wextra (cc builds with it); keep the build log about our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if QD_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#pragma GCC diagnostic pop

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

thread_local std::string g_last_error;

int fail(int code, std::string msg) {
  g_last_error = std::move(msg);
  return code;
}

// c10::Error::what() carries a C++ backtrace that is noise for users.
std::string describe(const std::exception& e) {
  if (auto* ce = dynamic_cast<const c10::Error*>(&e)) return ce->what_without_backtrace();
  return e.what();
}

std::string secs(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

bool contains(const std::string& s, const char* needle) {
  return s.find(needle) != std::string::npos;
}

std::string hb_key(int r) { return "qlora_dist/hb/" + std::to_string(r); }

std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

// State shared with the heartbeat and watchdog threads. They hold it by shared_ptr so that a
// group destroyed after a failure can detach them instead of joining a blocked thread.
struct Monitor {
  int rank = 0;
  int world = 1;
  std::string master;  // "addr:port", for messages
  milliseconds timeout{0};
  milliseconds period{0};
  c10::intrusive_ptr<c10d::Store> store;  // private client: TCPStore ops are serialised per client

  std::atomic<bool> stop{false};
  std::mutex stop_mu;
  std::condition_variable stop_cv;

  std::atomic<int64_t> seq{0};               // number of the collective started last
  std::atomic<int64_t> inflight_ns{0};       // steady-clock start of the running collective, 0 if none
  std::atomic<const char*> inflight_op{""};  // string literal naming it

  std::mutex mu;  // guards everything below
  std::vector<int64_t> beat, peer_seq;
  std::vector<std::string> state;
  std::vector<Clock::time_point> last_change;
  bool store_failed = false;
  std::string store_error;

  milliseconds stale_after() const { return period * 3; }

  void sleep_for(milliseconds d) {
    std::unique_lock<std::mutex> lk(stop_mu);
    stop_cv.wait_for(lk, d, [&] { return stop.load(); });
  }

  void heartbeat_loop() {
    std::vector<std::string> keys;
    for (int r = 0; r < world; ++r) keys.push_back(hb_key(r));
    int64_t my_beat = 0;
    while (!stop.load()) {
      ++my_beat;
      bool ok;
      {
        std::lock_guard<std::mutex> lk(mu);
        ok = !store_failed;
      }
      if (ok) {
        try {
          store->set(hb_key(rank), bytes(std::to_string(my_beat) + " " +
                                         std::to_string(seq.load()) + " run"));
          auto vals = store->multiGet(keys);
          auto now = Clock::now();
          std::lock_guard<std::mutex> lk(mu);
          for (int r = 0; r < world && r < (int)vals.size(); ++r) {
            std::string v(vals[r].begin(), vals[r].end());
            std::istringstream in(v);
            int64_t b = 0, s = 0;
            std::string st;
            in >> b >> s >> st;
            if (b != beat[r] || st != state[r]) {
              beat[r] = b;
              last_change[r] = now;
            }
            peer_seq[r] = s;
            state[r] = st;
          }
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lk(mu);
          store_failed = true;
          store_error = describe(e);
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu);
          store_failed = true;
          store_error = "unknown error";
        }
      }
      sleep_for(period);
    }
  }

  // Names the peers that explain a failure of collective `my_seq`. With `wait`, gives a
  // peer that died just now time to miss enough beats to be told apart from a live one.
  // Only reads state the heartbeat thread keeps, so it cannot block on the network.
  std::pair<bool, std::string> diagnose(int64_t my_seq, bool wait) {
    auto deadline = Clock::now() + (wait ? stale_after() + period : milliseconds(0));
    for (;;) {
      {
        std::lock_guard<std::mutex> lk(mu);
        auto now = Clock::now();
        std::ostringstream out;
        bool found = false;
        for (int r = 0; r < world; ++r) {
          if (r == rank) continue;
          if (state[r] == "exit") {
            out << (found ? "; " : "") << "rank " << r
                << " left the group (it finished or shut down) while rank " << rank
                << " was in collective #" << my_seq;
            found = true;
          } else if (now - last_change[r] > stale_after()) {
            double quiet = std::chrono::duration<double>(now - last_change[r]).count();
            out << (found ? "; " : "") << "lost rank " << r << ": no heartbeat for "
                << secs(quiet) << " (the process died, was killed or is hung; it last reported collective #"
                << peer_seq[r] << ")";
            found = true;
          }
        }
        if (!found && store_failed && rank != 0) {
          out << "lost rank 0: the TCPStore it hosts at " << master
              << " stopped answering (rank 0 died or its host is unreachable): " << store_error;
          found = true;
        }
        if (found) return {true, out.str()};
        if (now >= deadline) {
          std::ostringstream late;
          bool any = false;
          for (int r = 0; r < world; ++r) {
            if (r != rank && peer_seq[r] < my_seq) {
              late << (any ? "; " : "") << "rank " << r << " has not reached collective #"
                   << my_seq << " (it is at #" << peer_seq[r] << ")";
              any = true;
            }
          }
          if (any) return {true, "peer(s) alive but late: " + late.str()};
          return {false, "every peer still has a live heartbeat; no lost rank identified"};
        }
      }
      std::this_thread::sleep_for(period / 5);
    }
  }

  // The backends' own timeouts should always fire first; this is the last resort that keeps
  // a wedged process (e.g. a blocked socket in a dead peer's host) from hanging forever.
  void watchdog_loop() {
    const auto limit = timeout + stale_after() + period + milliseconds(5000);
    while (!stop.load()) {
      int64_t t0 = inflight_ns.load();
      if (t0 != 0) {
        auto started = Clock::time_point(Clock::duration(t0));
        if (Clock::now() - started > limit) {
          auto d = diagnose(seq.load(), false);
          std::fprintf(stderr,
                       "qlora dist: rank %d: %s (collective #%lld) has not finished after %s "
                       "(timeout %s): %s; aborting the process\n",
                       rank, inflight_op.load(), (long long)seq.load(), secs(since(started)).c_str(),
                       secs(timeout.count() / 1000.0).c_str(), d.second.c_str());
          std::fflush(stderr);
          std::_Exit(3);
        }
      }
      sleep_for(std::min(period, milliseconds(250)));
    }
  }
};

// How often the heartbeat thread beats for a collective timeout.
milliseconds heartbeat_period(milliseconds timeout) {
  return std::clamp(timeout / 10, milliseconds(50), milliseconds(1000));
}

// The timeout given to ProcessGroupNCCL's own watchdog. It must fire after ours (the
// collective's deadline, then the lost-peer diagnosis, then the last-resort watchdog of
// Monitor::watchdog_loop), or NCCL tears the process down before we can name the lost rank.
milliseconds nccl_watchdog_timeout(milliseconds timeout) {
  const milliseconds period = heartbeat_period(timeout);
  return timeout + period * 3 + period + milliseconds(5000) + milliseconds(30000);
}

// Waits until `work` has completed or `deadline` passed. Work::wait(timeout) of a NCCL work
// without TORCH_NCCL_BLOCKING_WAIT only makes the current stream wait for the collective and
// returns at once, true, whether or not it completed; a lost peer would then pass for success
// here and hang or fail later, unnamed. So completion and the work's exception are checked.
void wait_completed(c10d::Work& work, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  if (!work.wait(timeout)) TORCH_CHECK(false, "the collective did not complete within the timeout");
  auto pause = std::chrono::microseconds(20);
  while (!work.isCompleted()) {
    TORCH_CHECK(Clock::now() < deadline, "the collective did not complete within the timeout");
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(2000));
  }
  if (auto e = work.exception()) std::rethrow_exception(e);
}

// A work whose completion the wait-logic self-test scripts (see qd_wait_selftest).
class ScriptedWork : public c10d::Work {
 public:
  ScriptedWork(milliseconds completes_after, bool fails)
      : done_at_(Clock::now() + completes_after), fails_(fails) {}
  bool wait(std::chrono::milliseconds) override { return true; }  // as NCCL's non-blocking wait
  bool isCompleted() override { return Clock::now() >= done_at_; }
  std::exception_ptr exception() const override {
    if (!fails_ || Clock::now() < done_at_) return nullptr;
    return std::make_exception_ptr(std::runtime_error("NCCL communicator was aborted"));
  }

 private:
  Clock::time_point done_at_;
  bool fails_;
};

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

}  // namespace

struct qd_group {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  milliseconds timeout{0};
  c10::intrusive_ptr<c10d::Store> store;  // rank 0 hosts the server
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
#if QD_HAVE_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
#endif
  std::shared_ptr<Monitor> mon;
  std::thread heartbeat, watchdog;
  bool broken = false;
  std::string broken_msg;
  // QLORA_DIST_CUDA_BACKEND=gloo: CUDA tensors go through Gloo too (several ranks sharing one
  // GPU, which NCCL refuses; scripts/gpu-check.sh tests our device handling that way).
  bool cuda_on_gloo = false;

  // Only reached with live threads when qd_init fails half-way; qd_destroy joins or detaches
  // them itself. A joinable std::thread must never be destroyed (std::terminate).
  ~qd_group() {
    if (mon) {
      {
        std::lock_guard<std::mutex> lk(mon->stop_mu);
        mon->stop.store(true);
      }
      mon->stop_cv.notify_all();
    }
    if (heartbeat.joinable()) heartbeat.join();
    if (watchdog.joinable()) watchdog.join();
  }
};

namespace {

// Runs one collective with the bookkeeping the diagnosis needs, and turns every failure into
// an error code plus a message that names the lost peer when one can be identified.
template <class F>
int run_collective(qd_group* g, const char* op, F&& body) {
  if (g == nullptr) return fail(QD_ERR_INVALID, std::string(op) + ": null process group");
  if (g->broken) {
    return fail(QD_ERR_BROKEN, std::string(op) + " on rank " + std::to_string(g->rank) +
                                   ": the process group is unusable after an earlier failure: " +
                                   g->broken_msg);
  }
  auto& mon = *g->mon;
  const int64_t my_seq = mon.seq.fetch_add(1) + 1;
  mon.inflight_op.store(op);
  mon.inflight_ns.store(Clock::now().time_since_epoch().count());
  std::string err;
  int code = QD_OK;
  try {
    code = body();
    if (code == QD_OK) {
      mon.inflight_ns.store(0);
      return QD_OK;
    }
  } catch (const std::exception& e) {
    err = describe(e);
  } catch (...) {
    err = "unknown C++ exception";
  }
  if (code != QD_OK) {  // an argument error from the body: the group stays usable
    mon.inflight_ns.store(0);
    return code;
  }
  // After a timeout the heartbeats already cover the whole wait; after a connection error a
  // peer may have died a moment ago, so give its heartbeat time to go quiet.
  const bool timed_out = contains(err, "imed out") || contains(err, "imeout");
  auto diag = mon.diagnose(my_seq, !timed_out);
  mon.inflight_ns.store(0);
  code = diag.first ? QD_ERR_PEER_LOST : (timed_out ? QD_ERR_TIMEOUT : QD_ERR_COLLECTIVE);
  std::ostringstream msg;
  msg << op << " (collective #" << my_seq << ") failed on rank " << g->rank << " of "
      << g->world << ": " << diag.second << ". Backend error: " << err;
  g->broken = true;
  g->broken_msg = msg.str();
  return fail(code, msg.str());
}

int check_tensor(const at::Tensor* t, const char* op, const char* what) {
  if (t == nullptr || !t->defined())
    return fail(QD_ERR_INVALID, std::string(op) + ": " + what + " is null or undefined");
  if (!t->is_contiguous() || t->is_sparse())
    return fail(QD_ERR_INVALID, std::string(op) + ": " + what + " must be dense and contiguous");
  if (!t->is_cpu() && !t->is_cuda())
    return fail(QD_ERR_INVALID, std::string(op) + ": " + what + " is on " +
                                    t->device().str() + "; only CPU and CUDA are supported");
  return QD_OK;
}

// The backend for a tensor's device: Gloo for CPU, NCCL (created on first use) for CUDA.
c10d::Backend* backend_for(qd_group* g, const at::Tensor& t) {
  if (t.is_cpu() || g->cuda_on_gloo) return g->gloo.get();
#if QD_HAVE_NCCL
  if (!g->nccl) {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = nccl_watchdog_timeout(g->timeout);
    // NCCL's heartbeat monitor ends a process whose watchdog is stuck; give it longer than
    // a whole timed-out collective takes us, unless the user chose.
    const auto heartbeat_s =
        std::max<int64_t>(480, std::chrono::duration_cast<std::chrono::seconds>(opts->timeout).count() + 60);
    setenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", std::to_string(heartbeat_s).c_str(), 0);
    auto store = c10::make_intrusive<c10d::PrefixStore>("qlora_dist/nccl/", g->store);
    g->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, g->rank, g->world, opts);
  }
  return g->nccl.get();
#else
  return nullptr;
#endif
}

void wait_for(const c10::intrusive_ptr<c10d::Work>& work, milliseconds timeout) {
  wait_completed(*work, timeout);
}

int no_nccl(const char* op) {
  return fail(QD_ERR_NO_NCCL,
              std::string(op) +
                  ": CUDA tensor, but this build has no ProcessGroupNCCL support (nccl.h or the "
                  "CUDA headers were not found when kernels/dist.cpp was compiled)");
}

}  // namespace

extern "C" {

int qd_nccl_compiled(void) { return QD_HAVE_NCCL; }

int64_t qd_nccl_watchdog_timeout_ms(int64_t timeout_ms) {
  return nccl_watchdog_timeout(milliseconds(timeout_ms)).count();
}

int qd_wait_selftest(int64_t completes_after_ms, int fails, int64_t timeout_ms) {
  g_last_error.clear();
  try {
    ScriptedWork w(milliseconds(completes_after_ms), fails != 0);
    wait_completed(w, milliseconds(timeout_ms));
    return QD_OK;
  } catch (const std::exception& e) {
    const std::string what = e.what();
    const bool timed_out = what.find("did not complete within the timeout") != std::string::npos;
    return fail(timed_out ? QD_ERR_TIMEOUT : QD_ERR_COLLECTIVE, what);
  }
}

const char* qd_last_error(void) { return g_last_error.c_str(); }

int qd_init(const char* master_addr, int port, int rank, int world_size, int local_rank,
            int64_t timeout_ms, qd_group** out) {
  g_last_error.clear();
  if (out == nullptr || master_addr == nullptr)
    return fail(QD_ERR_INVALID, "qd_init: null argument");
  *out = nullptr;
  if (world_size < 1 || rank < 0 || rank >= world_size)
    return fail(QD_ERR_INVALID, "qd_init: rank " + std::to_string(rank) +
                                    " is outside world size " + std::to_string(world_size));
  if (port <= 0 || port > 65535)
    return fail(QD_ERR_INVALID, "qd_init: invalid port " + std::to_string(port));
  if (timeout_ms <= 0) return fail(QD_ERR_INVALID, "qd_init: timeout must be positive");

  const std::string addr(master_addr);
  const std::string where = addr + ":" + std::to_string(port);
  auto g = std::make_unique<qd_group>();
  g->rank = rank;
  g->world = world_size;
  g->local_rank = local_rank;
  g->timeout = milliseconds(timeout_ms);
  if (const char* b = std::getenv("QLORA_DIST_CUDA_BACKEND")) g->cuda_on_gloo = std::string(b) == "gloo";
  const char* stage = rank == 0 ? "starting the TCPStore server"
                                 : "connecting to the TCPStore hosted by rank 0 (is it running?)";
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = std::nullopt;  // our own rendezvous below names missing ranks
    so.waitWorkers = false;
    so.timeout = g->timeout;
    g->store = c10::make_intrusive<c10d::TCPStore>(addr, so);

    // Rendezvous: everyone publishes its heartbeat key, then waits for all of them.
    stage = "waiting for all ranks to join";
    g->store->set(hb_key(rank), bytes("0 0 run"));
    std::vector<std::string> keys;
    for (int r = 0; r < world_size; ++r) keys.push_back(hb_key(r));
    try {
      g->store->wait(keys, g->timeout);
    } catch (...) {
      std::ostringstream missing;
      bool any = false;
      for (int r = 0; r < world_size; ++r) {
        bool present = false;
        try {
          present = g->store->check({hb_key(r)});
        } catch (...) {
        }
        if (!present) {
          missing << (any ? ", " : "") << r;
          any = true;
        }
      }
      if (any)
        return fail(QD_ERR_RENDEZVOUS, "rendezvous at " + where + " failed on rank " +
                                           std::to_string(rank) + ": rank(s) " + missing.str() +
                                           " never joined within " +
                                           secs(timeout_ms / 1000.0));
      throw;
    }

    stage = "creating the Gloo process group";
    auto opts = c10d::ProcessGroupGloo::Options::create(g->timeout);
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && *ifname != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (is_loopback(addr)) {
      // Single-host runs: stay on loopback whatever the hostname resolves to.
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto gloo_store = c10::make_intrusive<c10d::PrefixStore>("qlora_dist/gloo/", g->store);
    g->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(gloo_store, rank, world_size, opts);

    stage = "starting the heartbeat";
    auto mon = std::make_shared<Monitor>();
    mon->rank = rank;
    mon->world = world_size;
    mon->master = where;
    mon->timeout = g->timeout;
    mon->period = heartbeat_period(g->timeout);
    c10d::TCPStoreOptions ho;
    ho.port = static_cast<uint16_t>(port);
    ho.isServer = false;
    ho.waitWorkers = false;
    ho.timeout = g->timeout;
    mon->store = c10::make_intrusive<c10d::TCPStore>(addr, ho);
    auto now = Clock::now();
    mon->beat.assign(world_size, -1);
    mon->peer_seq.assign(world_size, 0);
    mon->state.assign(world_size, "run");
    mon->last_change.assign(world_size, now);
    g->mon = mon;
    g->heartbeat = std::thread([mon] { mon->heartbeat_loop(); });
    g->watchdog = std::thread([mon] { mon->watchdog_loop(); });
  } catch (const std::exception& e) {
    return fail(QD_ERR_RENDEZVOUS, std::string("distributed init on rank ") +
                                       std::to_string(rank) + " (" + where + ") failed while " +
                                       stage + ": " + describe(e));
  } catch (...) {
    return fail(QD_ERR_RENDEZVOUS, std::string("distributed init failed while ") + stage +
                                       ": unknown C++ exception");
  }
  *out = g.release();
  return QD_OK;
}

int qd_all_reduce_sum(qd_group* g, void* tensor) {
  g_last_error.clear();
  return run_collective(g, "all_reduce", [&]() -> int {
    auto* t = static_cast<at::Tensor*>(tensor);
    if (int c = check_tensor(t, "all_reduce", "tensor")) return c;
    auto* b = backend_for(g, *t);
    if (b == nullptr) return no_nccl("all_reduce");
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    wait_for(b->allreduce(ts, o), g->timeout);
    return QD_OK;
  });
}

int qd_broadcast(qd_group* g, void* tensor, int root) {
  g_last_error.clear();
  return run_collective(g, "broadcast", [&]() -> int {
    auto* t = static_cast<at::Tensor*>(tensor);
    if (int c = check_tensor(t, "broadcast", "tensor")) return c;
    if (root < 0 || root >= g->world)
      return fail(QD_ERR_INVALID, "broadcast: root " + std::to_string(root) +
                                      " is outside world size " + std::to_string(g->world));
    auto* b = backend_for(g, *t);
    if (b == nullptr) return no_nccl("broadcast");
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.rootTensor = 0;
    o.timeout = g->timeout;
    wait_for(b->broadcast(ts, o), g->timeout);
    return QD_OK;
  });
}

int qd_all_gather(qd_group* g, void* input, void* const* outputs, int n_outputs) {
  g_last_error.clear();
  return run_collective(g, "all_gather", [&]() -> int {
    auto* in = static_cast<at::Tensor*>(input);
    if (int c = check_tensor(in, "all_gather", "input")) return c;
    if (outputs == nullptr || n_outputs != g->world)
      return fail(QD_ERR_INVALID, "all_gather: expected " + std::to_string(g->world) +
                                      " output tensors, got " + std::to_string(n_outputs));
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int r = 0; r < n_outputs; ++r) {
      auto* o = static_cast<at::Tensor*>(outputs[r]);
      if (int c = check_tensor(o, "all_gather", "output")) return c;
      if (o->sizes() != in->sizes() || o->scalar_type() != in->scalar_type() ||
          o->device() != in->device())
        return fail(QD_ERR_INVALID,
                    "all_gather: every output must match the input's shape, dtype and device");
      outs[0].push_back(*o);
    }
    auto* b = backend_for(g, *in);
    if (b == nullptr) return no_nccl("all_gather");
    std::vector<at::Tensor> ins{*in};
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    wait_for(b->allgather(outs, ins, o), g->timeout);
    return QD_OK;
  });
}

int qd_barrier(qd_group* g) {
  g_last_error.clear();
  // Always on Gloo: a CPU barrier needs no device and orders host code, which is what callers want.
  return run_collective(g, "barrier", [&]() -> int {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait_for(g->gloo->barrier(o), g->timeout);
    return QD_OK;
  });
}

int64_t qd_collectives_started(qd_group* g) {
  return (g != nullptr && g->mon) ? g->mon->seq.load() : 0;
}

void qd_destroy(qd_group* g) {
  if (g == nullptr) return;
  try {
    auto mon = g->mon;
    if (mon) {
      {
        std::lock_guard<std::mutex> lk(mon->stop_mu);
        mon->stop.store(true);
      }
      mon->stop_cv.notify_all();
    }
    if (g->broken) {
      // A thread may be blocked on the network and a backend destructor may wait for a dead
      // peer: leak them; the process is about to exit with the error anyway.
      if (g->heartbeat.joinable()) g->heartbeat.detach();
      if (g->watchdog.joinable()) g->watchdog.detach();
      (void)g->gloo.release();
#if QD_HAVE_NCCL
      (void)g->nccl.release();
#endif
      (void)g->store.release();
      delete g;
      return;
    }
    if (g->heartbeat.joinable()) g->heartbeat.join();
    if (g->watchdog.joinable()) g->watchdog.join();
    if (mon) {
      // Tell peers still running that this rank left on purpose, so a later failure on
      // their side is reported as "left the group", not as a crash.
      try {
        mon->store->set(hb_key(g->rank), bytes("-1 " + std::to_string(mon->seq.load()) + " exit"));
      } catch (...) {
      }
    }
#if QD_HAVE_NCCL
    if (g->nccl) {
      try {
        g->nccl->shutdown();
      } catch (...) {
      }
    }
#endif
    delete g;
  } catch (...) {
    // Nothing sensible to report from a destructor path.
  }
}

}  // extern "C"
