// Paged KV cache and causal attention over it, for prefill and decode alike.
//
// The pool is a table of chunks, each holding `per_chunk` blocks of every layer:
// [layer][k|v][block in chunk][block_size][kv_heads][head_dim], f32.

#define MAX_HEAD_DIM 256

__device__ __forceinline__ float* kv_row(const u64* chunks, u32 per_chunk, int layer, int kv,
                                         u32 slot, int block_size, int kv_heads, int head_dim, int kv_head) {
    const u32 block = slot / block_size, off = slot % block_size;
    const size_t block_len = (size_t)block_size * kv_heads * head_dim;
    float* base = (float*)chunks[block / per_chunk];
    const size_t plane = ((size_t)layer * 2 + kv) * per_chunk + block % per_chunk;
    return base + plane * block_len + ((size_t)off * kv_heads + kv_head) * head_dim;
}

// Grid (tokens); stores token t's K and V rows at slots[t].
extern "C" __global__ void write_kv(const u64* chunks, u32 per_chunk, int layer, const float* k,
                                    const float* v, const u32* slots, int block_size, int kv_heads, int head_dim) {
    const int t = blockIdx.x, width = kv_heads * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const int h = i / head_dim, d = i % head_dim;
        kv_row(chunks, per_chunk, layer, 0, slots[t], block_size, kv_heads, head_dim, h)[d] = k[(size_t)t * width + i];
        kv_row(chunks, per_chunk, layer, 1, slots[t], block_size, kv_heads, head_dim, h)[d] = v[(size_t)t * width + i];
    }
}

// One warp per (token, query head): online softmax over positions 0..=positions[t] of the
// token's sequence, the head's dims spread over the lanes. block_tables is flattened; the
// sequence's table starts at table_start[seq[t]].
extern "C" __global__ void paged_attention(const u64* chunks, u32 per_chunk, int layer,
                                           const float* q, float* out, const u32* positions, const u32* seq,
                                           const u32* table_start, const u32* tables, int tokens, int heads,
                                           int kv_heads, int head_dim, int block_size, float scale) {
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
        const float* kr = kv_row(chunks, per_chunk, layer, 0, slot, block_size, kv_heads, head_dim, kvh);
        const float* vr = kv_row(chunks, per_chunk, layer, 1, slot, block_size, kv_heads, head_dim, kvh);
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
            const int d = lane + 32 * j;
            if (j < per_lane && d < head_dim) dot += qr[j] * kr[d];
        }
        const float s = warp_sum(dot);
        const float new_max = fmaxf(max_s, s);
        const float correction = expf(max_s - new_max), e = expf(s - new_max);
        denom = denom * correction + e;
#pragma unroll
        for (int j = 0; j < MAX_HEAD_DIM / 32; j++) {
            const int d = lane + 32 * j;
            if (j < per_lane && d < head_dim) acc[j] = acc[j] * correction + e * vr[d];
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
