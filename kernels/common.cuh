// Prelude prepended to every kernel source before NVRTC compiles it. Header-free on purpose:
// NVRTC then needs no CUDA include directory, so the PTX check runs from the nvrtc wheel alone.
// Storage dtypes: 0 = f32, 1 = bf16, 2 = f16 (16-bit values travel as unsigned short).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NO_SEGMENT 0xffffffffu

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, NaN stays NaN (what torch and the `half` crate do).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

template <int DT> __device__ __forceinline__ float load_as_f32(const void* p, size_t i);
template <> __device__ __forceinline__ float load_as_f32<0>(const void* p, size_t i) { return ((const float*)p)[i]; }
template <> __device__ __forceinline__ float load_as_f32<1>(const void* p, size_t i) { return bf16_to_f32(((const u16*)p)[i]); }
template <> __device__ __forceinline__ float load_as_f32<2>(const void* p, size_t i) { return f16_to_f32(((const u16*)p)[i]); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}

// Paged storage is a table of chunk base pointers (chunks are allocated on first use, so an
// untouched part of a pool costs no device memory): element `i` of unit `u` (a KV block or an
// adapter page) of `unit_len` elements lives in chunk `u / per_chunk`.
template <typename T>
__device__ __forceinline__ T* chunk_ptr(const u64* chunks, u32 unit, u32 per_chunk, size_t unit_len) {
    return (T*)chunks[unit / per_chunk] + (size_t)(unit % per_chunk) * unit_len;
}
