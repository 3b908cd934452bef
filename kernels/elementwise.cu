// Row-wise and element-wise kernels of the forward pass. Activations are f32.

template <int DT>
__device__ void embed(const void* table, const u32* ids, float* out, int width) {
    const size_t row = (size_t)ids[blockIdx.x] * width;
    float* o = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = load_as_f32<DT>(table, row + i);
}
extern "C" __global__ void embed_f32(const void* t, const u32* ids, float* out, int w) { embed<0>(t, ids, out, w); }
extern "C" __global__ void embed_bf16(const void* t, const u32* ids, float* out, int w) { embed<1>(t, ids, out, w); }
extern "C" __global__ void embed_f16(const void* t, const u32* ids, float* out, int w) { embed<2>(t, ids, out, w); }

extern "C" __global__ void add_bias(float* x, const float* bias, int width, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += bias[i % width];
}

extern "C" __global__ void add(float* acc, const float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc[i] += x[i];
}

extern "C" __global__ void silu_mul(float* gate, const float* up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// One block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int width, float eps) {
    const float* xr = x + (size_t)blockIdx.x * width;
    float* o = out + (size_t)blockIdx.x * width;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += xr[i] * xr[i];
    const float inv = rsqrtf(block_sum(ss) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

// Rotate-half RoPE over the first 2 * half_dim values of each head; grid (tokens, heads).
// cos_t/sin_t hold one row per token (the host gathers the rows of the batch's positions).
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int heads, int head_dim,
                                int half_dim) {
    float* h = x + ((size_t)blockIdx.x * heads + blockIdx.y) * head_dim;
    const size_t p = (size_t)blockIdx.x * half_dim;
    for (int i = threadIdx.x; i < half_dim; i += blockDim.x) {
        const float a = h[i], b = h[i + half_dim], c = cos_t[p + i], s = sin_t[p + i];
        h[i] = a * c - b * s;
        h[i + half_dim] = b * c + a * s;
    }
}

// out[i, :] = x[rows[i], :]; one block per output row.
extern "C" __global__ void gather_rows(const float* x, const u32* rows, float* out, int width) {
    const float* src = x + (size_t)rows[blockIdx.x] * width;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// Activations rounded to the weights' 16-bit type, the input of cuBLAS's bf16/f16 GEMM.
extern "C" __global__ void to_bf16(const float* x, u16* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}
extern "C" __global__ void to_f16(const float* x, u16* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_f16(x[i]);
}
