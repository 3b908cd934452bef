// Paged KV cache and causal attention over it, for prefill and decode alike.
//
// The pool is a table of chunks, each holding `per_chunk` blocks of every layer:
// [layer][k|v][block in chunk][block_size][kv_heads][head_dim], in the pool's dtype.

#define MAX_HEAD_DIM 256

// Entries are stored as DT (0 = f32, 1 = bf16, 2 = f16; common.cuh): computed in f32, rounded
// when written, widened when read.
template <int DT> struct kv_elem { typedef float t; };
template <> struct kv_elem<1> { typedef u16 t; };
template <> struct kv_elem<2> { typedef u16 t; };

template <int DT> __device__ __forceinline__ typename kv_elem<DT>::t kv_store(float x);
template <> __device__ __forceinline__ float kv_store<0>(float x) { return x; }
template <> __device__ __forceinline__ u16 kv_store<1>(float x) { return f32_to_bf16(x); }
template <> __device__ __forceinline__ u16 kv_store<2>(float x) { return f32_to_f16(x); }

template <int DT>
__device__ __forceinline__ typename kv_elem<DT>::t* kv_row(const u64* chunks, u32 per_chunk, int layer, int kv,
                                                         u32 slot, int block_size, int kv_heads, int head_dim,
                                                         int kv_head) {
    typedef typename kv_elem<DT>::t E;
    const u32 block = slot / block_size, off = slot % block_size;
    const size_t block_len = (size_t)block_size * kv_heads * head_dim;
    E* base = (E*)chunks[block / per_chunk];
    const size_t plane = ((size_t)layer * 2 + kv) * per_chunk + block % per_chunk;
    return base + plane * block_len + ((size_t)off * kv_heads + kv_head) * head_dim;
}

// Grid (tokens); stores token t's K and V rows at slots[t].
template <int DT>
__device__ void write_kv_impl(const u64* chunks, u32 per_chunk, int layer, const float* k, const float* v,
                              const u32* slots, int block_size, int kv_heads, int head_dim) {
    const int t = blockIdx.x, width = kv_heads * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const int h = i / head_dim, d = i % head_dim;
        kv_row<DT>(chunks, per_chunk, layer, 0, slots[t], block_size, kv_heads, head_dim, h)[d] =
            kv_store<DT>(k[(size_t)t * width + i]);
        kv_row<DT>(chunks, per_chunk, layer, 1, slots[t], block_size, kv_heads, head_dim, h)[d] =
            kv_store<DT>(v[(size_t)t * width + i]);
    }
}

// One warp per (token, query head): online softmax over positions 0..=positions[t] of the
// token's sequence, the head's dims spread over the lanes. block_tables is flattened; the
// sequence's table starts at table_start[seq[t]].
template <int DT>
__device__ void paged_attention_impl(const u64* chunks, u32 per_chunk, int layer, const float* q, float* out,
                                     const u32* positions, const u32* seq, const u32* table_start,
                                     const u32* tables, int tokens, int heads, int kv_heads, int head_dim,
                                     int block_size, float scale) {
    typedef typename kv_elem<DT>::t E;
    const int lane = threadIdx.x & 31;
    const int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= tokens * heads) return;
    const int t = item / heads, h = item % heads, kvh = h / (heads / kv_heads);
    const int per_lane = (head_dim + 31) / 32;
    const float* qh = q + (size_t)item * head_dim;
    float qr[MAX_HEAD_DIM / 32], acc[MAX_HEAD_DIM / 32];
#pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
        const int d = lane + 32 * j;
        qr[j] = (j < per_lane && d < head_dim) ? qh[d] * scale : 0.0f;
        acc[j] = 0.0f;
    }
    const u32* table = tables + table_start[seq[t]];
    float max_s = __int_as_float(0xff800000), denom = 0.0f;  // -inf
    for (u32 p = 0; p <= positions[t]; p++) {
        const u32 slot = table[p / block_size] * block_size + p % block_size;
        const E* kr = kv_row<DT>(chunks, per_chunk, layer, 0, slot, block_size, kv_heads, head_dim, kvh);
        const E* vr = kv_row<DT>(chunks, per_chunk, layer, 1, slot, block_size, kv_heads, head_dim, kvh);
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
            const int d = lane + 32 * j;
            if (j < per_lane && d < head_dim) dot += qr[j] * load_as_f32<DT>(kr, d);
        }
        const float s = warp_sum(dot);
        const float new_max = fmaxf(max_s, s);
        const float correction = expf(max_s - new_max), e = expf(s - new_max);
        denom = denom * correction + e;
#pragma unroll
        for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
            const int d = lane + 32 * j;
            if (j < per_lane && d < head_dim) acc[j] = acc[j] * correction + e * load_as_f32<DT>(vr, d);
        }
        max_s = new_max;
    }
    float* o = out + (size_t)item * head_dim;
#pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
        const int d = lane + 32 * j;
        if (j < per_lane && d < head_dim) o[d] = acc[j] / denom;
    }
}

#define KV_ENTRY_POINTS(SUFFIX, DT)                                                                          \
    extern "C" __global__ void write_kv_##SUFFIX(const u64* chunks, u32 per_chunk, int layer, const float* k, \
                                                 const float* v, const u32* slots, int block_size,            \
                                                 int kv_heads, int head_dim) {                                \
        write_kv_impl<DT>(chunks, per_chunk, layer, k, v, slots, block_size, kv_heads, head_dim);            \
    }                                                                                                        \
    extern "C" __global__ void paged_attention_##SUFFIX(                                                     \
        const u64* chunks, u32 per_chunk, int layer, const float* q, float* out, const u32* positions,       \
        const u32* seq, const u32* table_start, const u32* tables, int tokens, int heads, int kv_heads,       \
        int head_dim, int block_size, float scale) {                                                         \
        paged_attention_impl<DT>(chunks, per_chunk, layer, q, out, positions, seq, table_start, tables,     \
                                 tokens, heads, kv_heads, head_dim, block_size, scale);                      \
    }

KV_ENTRY_POINTS(f32, 0)
KV_ENTRY_POINTS(bf16, 1)
KV_ENTRY_POINTS(f16, 2)
