// libtorch's current CUDA stream of a device, for our kernel launchers: they launch where
// torch's own work on the tensors is queued, so both stay ordered without a sync, and the
// caching allocator's stream-ordered reuse keeps the launchers' temporaries valid until the
// kernel has run. Without torch's CUDA library (a CPU-only wheel) or when the device has no
// stream (no GPU), the legacy default stream (null), which orders with torch's default stream.
#if defined(QLORA_HAVE_C10_CUDA) && __has_include(<c10/cuda/CUDAStream.h>) && \
    __has_include(<cuda_runtime_api.h>)
#include <c10/cuda/CUDAStream.h>

extern "C" void* qlora_current_cuda_stream(int device) {
    try {
        return (void*)c10::cuda::getCurrentCUDAStream((c10::DeviceIndex)device).stream();
    } catch (...) {
        return nullptr;
    }
}
#else
extern "C" void* qlora_current_cuda_stream(int) { return nullptr; }
#endif
