// What the CUDA device has: free and total memory, for `gradient_checkpointing: auto`'s
// budget (libtorch's caching allocator does not expose cudaMemGetInfo through tch).
#include <cuda_runtime.h>
#include <stddef.h>

extern "C" int qlora_cuda_mem_get_info(int device, size_t* free_bytes, size_t* total_bytes) {
    int previous = 0;
    cudaError_t err = cudaGetDevice(&previous);
    if (err != cudaSuccess) return (int)err;
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return (int)err;
    err = cudaMemGetInfo(free_bytes, total_bytes);
    cudaSetDevice(previous);
    return (int)err;
}
