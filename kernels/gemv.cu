// Skinny matmul for decode: out[m, n] = x[m, k] · wᵀ with w [n, k] in its storage dtype and f32
// x, accumulated in f32 (exact like the CPU kernel; cuBLAS would need x rounded to 16 bits).
// One warp per output column n; m ≤ GEMV_MAX_M rows share each weight load, which is the point:
// decode is bound by streaming w once.

#define GEMV_MAX_M 8

template <int DT>
__device__ void gemv(const float* x, int m, const void* w, float* out, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= n) return;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; r++) acc[r] = 0.0f;
    const size_t row = (size_t)col * k;
    for (int i = lane; i < k; i += 32) {
        const float wv = load_as_f32<DT>(w, row + i);
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; r++)
            if (r < m) acc[r] += wv * x[(size_t)r * k + i];
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; r++) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) out[(size_t)r * n + col] = s;
        }
    }
}
extern "C" __global__ void gemv_f32(const float* x, int m, const void* w, float* out, int n, int k) { gemv<0>(x, m, w, out, n, k); }
extern "C" __global__ void gemv_bf16(const float* x, int m, const void* w, float* out, int n, int k) { gemv<1>(x, m, w, out, n, k); }
extern "C" __global__ void gemv_f16(const float* x, int m, const void* w, float* out, int n, int k) { gemv<2>(x, m, w, out, n, k); }
