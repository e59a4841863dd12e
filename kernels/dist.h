// C ABI over libtorch's c10d (TCPStore rendezvous, ProcessGroupGloo for CPU tensors,
// ProcessGroupNCCL for CUDA tensors). Implemented in dist.cpp; used by src/dist.rs.
//
// Every function returns a QD_* code; on failure the message is available from
// qd_last_error() on the same thread. No C++ exception crosses this boundary.
// Tensors are `at::Tensor*` as handed out by tch (`Tensor::as_ptr`); they must be dense
// and contiguous, and collectives write into them in place.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qd_group qd_group;

enum {
  QD_OK = 0,
  QD_ERR_INVALID = 1,     // bad argument (null handle, non-contiguous tensor, bad rank...)
  QD_ERR_RENDEZVOUS = 2,  // store unreachable or a rank never joined
  QD_ERR_COLLECTIVE = 3,  // the backend reported an error, no lost peer identified
  QD_ERR_TIMEOUT = 4,     // the collective did not finish within the timeout
  QD_ERR_PEER_LOST = 5,   // a peer died, hung or left; the message names it
  QD_ERR_NO_NCCL = 6,     // CUDA tensor but the shim was built without NCCL support
  QD_ERR_BROKEN = 7,      // an earlier collective failed; the group is unusable
  QD_ERR_INTERNAL = 8,
};

// Rendezvous through a TCPStore at master_addr:port (hosted by rank 0), then builds the
// Gloo process group. timeout_ms bounds the rendezvous and every collective.
int qd_init(const char* master_addr, int port, int rank, int world_size, int local_rank,
            int64_t timeout_ms, qd_group** out);
// Sum over ranks, in place.
int qd_all_reduce_sum(qd_group* g, void* tensor);
// Copies root's tensor into everyone's, in place.
int qd_broadcast(qd_group* g, void* tensor, int root);
// outputs: world_size tensors shaped like input (same device and dtype), filled in rank order.
int qd_all_gather(qd_group* g, void* input, void* const* outputs, int n_outputs);
int qd_barrier(qd_group* g);
// Number of collectives this rank has started (successful or not), for tests and logs.
int64_t qd_collectives_started(qd_group* g);
// 1 when ProcessGroupNCCL support was compiled in.
int qd_nccl_compiled(void);
// The timeout the shim gives ProcessGroupNCCL's watchdog for a collective timeout of
// `timeout_ms`: longer than the shim's own deadline, diagnosis and last-resort watchdog.
int64_t qd_nccl_watchdog_timeout_ms(int64_t timeout_ms);
// Self-test of the wait logic used for every collective, on a work that reports success from
// wait() at once (as NCCL's non-blocking wait does) and completes `completes_after_ms` later,
// failing then when `fails`: QD_OK, QD_ERR_TIMEOUT or QD_ERR_COLLECTIVE.
int qd_wait_selftest(int64_t completes_after_ms, int fails, int64_t timeout_ms);
// Message of the last failed call on this thread (empty if none). Valid until the next qd_ call.
const char* qd_last_error(void);
// Releases the group. After a failure the backends are deliberately leaked (their
// destructors can block on a dead peer); the process is expected to exit.
void qd_destroy(qd_group* g);

#ifdef __cplusplus
}
#endif
