// Block-quantized weights in the CPU backend's layout (crates/tensor/src/quant.rs), uploaded as
// they are: rows in panels of 16; a panel stores block after block (32 inputs each), and within
// a block byte g*64 + r*4 + t holds row r's code for column 4g + t (int8: a signed byte, g < 8) or
// its codes for columns 8g + t (low nibble) and 8g + 4 + t (high nibble) (int4: value code - 8,
// g < 4). Scales are f16, [panel][block][16 rows]. Optional zero shifts (GPTQ/AWQ imports), i16
// [row][block]: the block's values move by shift * scale. FMT: 0 = int8, 1 = int4.

#define QPANEL 16
#define QBLOCK 32
#define QWARPS 4
#define QMAX_M 8  // GEMV_MAX_M in crates/cuda/src/linear.rs

template <int FMT> __device__ __forceinline__ size_t panel_block_bytes() { return QPANEL * (FMT == 0 ? 32 : 16); }

// Code value (scale not applied) of row r of a panel, column c of a block; `blk` is the panel block.
template <int FMT> __device__ __forceinline__ float code_value(const unsigned char* blk, int r, int c) {
    if (FMT == 0) return (float)(signed char)blk[(c >> 2) * 64 + r * 4 + (c & 3)];
    const unsigned int byte = blk[(c >> 3) * 64 + r * 4 + (c & 3)];
    return (float)((int)((c & 7) >= 4 ? byte >> 4 : byte & 15u) - 8);
}

// Weight (row, col) of the matrix, dequantized.
template <int FMT>
__device__ __forceinline__ float quant_weight(const unsigned char* codes, const u16* scales, const short* shifts,
                                              int nb, int row, int col) {
    const int p = row / QPANEL, r = row % QPANEL, b = col / QBLOCK;
    const size_t pb = (size_t)p * nb + b;
    float v = code_value<FMT>(codes + pb * panel_block_bytes<FMT>(), r, col % QBLOCK);
    if (shifts != nullptr) v += (float)shifts[(size_t)row * nb + b];
    return v * f16_to_f32(scales[pb * QPANEL + r]);
}

// out[m, n] = x[m, k] . W^T for m <= QMAX_M. One CTA of QWARPS warps per panel; the warps split the
// blocks, and within a warp half-warp h reads the block's 64-byte chunks h, h + 2, ... with lane
// % 16 as the row (a coalesced 64-byte load per half-warp; all 16 rows use the same x values).
// Each block's code-times-x sum is scaled once; a shifted block adds shift * scale * sum(x) with
// `xsums` (m x nb block sums of x). Pass null `shifts` (and `xsums`) for symmetric matrices.
template <int FMT>
__device__ void gemv_q(const float* x, int m, const unsigned char* codes, const u16* scales, const short* shifts,
                       const float* xsums, float* out, int n, int k, int nb) {
    const int panel = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane & 15, half = lane >> 4;
    const int row = panel * QPANEL + r;
    const int chunks = FMT == 0 ? 8 : 4;
    float acc[QMAX_M];
#pragma unroll
    for (int i = 0; i < QMAX_M; i++) acc[i] = 0.0f;
    for (int b = warp; b < nb; b += QWARPS) {
        const size_t pb = (size_t)panel * nb + b;
        const unsigned char* blk = codes + pb * panel_block_bytes<FMT>();
        float part[QMAX_M];
#pragma unroll
        for (int i = 0; i < QMAX_M; i++) part[i] = 0.0f;
        for (int g = half; g < chunks; g += 2) {
            const u32 word = *(const u32*)(blk + g * 64 + r * 4);
#pragma unroll
            for (int t = 0; t < 4; t++) {
                const u32 byte = (word >> (8 * t)) & 0xffu;
                if (FMT == 0) {
                    const int col = b * QBLOCK + 4 * g + t;
                    const float q = (float)(signed char)byte;
#pragma unroll
                    for (int i = 0; i < QMAX_M; i++)
                        if (i < m && col < k) part[i] += q * x[(size_t)i * k + col];
                } else {
                    const int lo = b * QBLOCK + 8 * g + t, hi = lo + 4;
                    const float ql = (float)((int)(byte & 15u) - 8), qh = (float)((int)(byte >> 4) - 8);
#pragma unroll
                    for (int i = 0; i < QMAX_M; i++) {
                        if (i < m && lo < k) part[i] += ql * x[(size_t)i * k + lo];
                        if (i < m && hi < k) part[i] += qh * x[(size_t)i * k + hi];
                    }
                }
            }
        }
        const float d = f16_to_f32(scales[pb * QPANEL + r]);
        const float zs = (shifts != nullptr && half == 0 && row < n) ? (float)shifts[(size_t)row * nb + b] * d : 0.0f;
#pragma unroll
        for (int i = 0; i < QMAX_M; i++)
            if (i < m) acc[i] += d * part[i] + (zs != 0.0f ? zs * xsums[(size_t)i * nb + b] : 0.0f);
    }
    __shared__ float red[QWARPS][QMAX_M][QPANEL];
#pragma unroll
    for (int i = 0; i < QMAX_M; i++) {
        acc[i] += __shfl_down_sync(0xffffffffu, acc[i], 16);
        if (half == 0) red[warp][i][r] = acc[i];
    }
    __syncthreads();
    if (warp == 0 && half == 0 && row < n) {
        for (int i = 0; i < m; i++) {
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < QWARPS; w++) s += red[w][i][r];
            out[(size_t)i * n + row] = s;
        }
    }
}
extern "C" __global__ void gemv_q8(const float* x, int m, const unsigned char* codes, const u16* scales,
                                   const short* shifts, const float* xsums, float* out, int n, int k, int nb) {
    gemv_q<0>(x, m, codes, scales, shifts, xsums, out, n, k, nb);
}
extern "C" __global__ void gemv_q4(const float* x, int m, const unsigned char* codes, const u16* scales,
                                   const short* shifts, const float* xsums, float* out, int n, int k, int nb) {
    gemv_q<1>(x, m, codes, scales, shifts, xsums, out, n, k, nb);
}

// sums[i, b] = sum of x[i, 32b .. min(k, 32b + 32)), for the zero shifts.
extern "C" __global__ void block_sums(const float* x, int m, int k, int nb, float* sums) {
    const size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (j >= (size_t)m * nb) return;
    const int i = j / nb, b = j % nb;
    float s = 0.0f;
    for (int c = b * QBLOCK; c < k && c < (b + 1) * QBLOCK; c++) s += x[(size_t)i * k + c];
    sums[j] = s;
}

// The whole matrix dequantized to f16 [n, k] (row-major), for cuBLAS at large m.
template <int FMT>
__device__ void dequant_q(const unsigned char* codes, const u16* scales, const short* shifts, u16* out, int n, int k,
                          int nb) {
    const size_t total = (size_t)n * k;
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < total; j += (size_t)gridDim.x * blockDim.x)
        out[j] = f32_to_f16(quant_weight<FMT>(codes, scales, shifts, nb, (int)(j / k), (int)(j % k)));
}
extern "C" __global__ void dequant_q8_f16(const unsigned char* c, const u16* s, const short* z, u16* out, int n, int k,
                                          int nb) {
    dequant_q<0>(c, s, z, out, n, k, nb);
}
extern "C" __global__ void dequant_q4_f16(const unsigned char* c, const u16* s, const short* z, u16* out, int n, int k,
                                          int nb) {
    dequant_q<1>(c, s, z, out, n, k, nb);
}

// Rows `ids` of a quantized table (a tied embedding stored as the LM head), widened to f32.
template <int FMT>
__device__ void embed_q(const unsigned char* codes, const u16* scales, const short* shifts, const u32* ids, float* out,
                        int width, int nb) {
    float* o = out + (size_t)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x)
        o[c] = quant_weight<FMT>(codes, scales, shifts, nb, (int)ids[blockIdx.x], c);
}
extern "C" __global__ void embed_q8(const unsigned char* c, const u16* s, const short* z, const u32* ids, float* out,
                                    int width, int nb) {
    embed_q<0>(c, s, z, ids, out, width, nb);
}
extern "C" __global__ void embed_q4(const unsigned char* c, const u16* s, const short* z, const u32* ids, float* out,
                                    int width, int nb) {
    embed_q<1>(c, s, z, ids, out, width, nb);
}
