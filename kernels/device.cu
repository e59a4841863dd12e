// What a CUDA device is and has, for `doctor`, the NCCL one-GPU-per-rank check and
// `gradient_checkpointing: auto`'s budget (libtorch's caching allocator does not expose
// cudaMemGetInfo or the device's UUID through tch).
#include <cuda_runtime.h>
#include <stddef.h>
#include <string.h>

// Makes `device` this thread's current device, once at start: every later launch then finds
// it current and never switches (a switch back to a device the rank never chose would create
// a context, ~0.5 GB, on GPU 0).
extern "C" int qlora_cuda_set_device(int device) {
    int current = -1;
    cudaError_t err = cudaGetDevice(&current);
    if (err == cudaSuccess && current == device) return 0;
    return (int)cudaSetDevice(device);
}

extern "C" int qlora_cuda_mem_get_info(int device, size_t* free_bytes, size_t* total_bytes) {
    int previous = 0;
    cudaError_t err = cudaGetDevice(&previous);
    if (err != cudaSuccess) return (int)err;
    if (previous != device && (err = cudaSetDevice(device)) != cudaSuccess) return (int)err;
    err = cudaMemGetInfo(free_bytes, total_bytes);
    if (previous != device) cudaSetDevice(previous);
    return (int)err;
}

// Name (NUL-terminated, cut to name_len), total memory, compute capability and the 16-byte
// UUID of `device`, without making it current.
extern "C" int qlora_cuda_device_info(int device, char* name, int name_len, size_t* total_bytes,
                                      int* major, int* minor, unsigned char* uuid16) {
    cudaDeviceProp p;
    cudaError_t err = cudaGetDeviceProperties(&p, device);
    if (err != cudaSuccess) return (int)err;
    if (name_len > 0) {
        strncpy(name, p.name, (size_t)name_len - 1);
        name[name_len - 1] = '\0';
    }
    *total_bytes = p.totalGlobalMem;
    *major = p.major;
    *minor = p.minor;
    memcpy(uuid16, p.uuid.bytes, 16);
    return 0;
}

extern "C" const char* qlora_cuda_error_name(int code) {
    return cudaGetErrorString((cudaError_t)code);
}
