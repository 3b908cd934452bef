// LoRA gather kernels over S-LoRA-style pages (f32 or bf16), any mix of ranks, no padding.
//
// Per forward step the host uploads one u32 metadata buffer, read by every adapted linear:
//   tok_run[tokens]        run of each token, NO_SEGMENT for base-only rows (shared by all slots)
//   per slot, at seg_base: runs * 4 entries: rank, scale (f32 bits), offset of its A page list,
//                          of its Bᵀ page list (rank 0: the run has no module in this slot)
//   pages[...]             page ids: A row j, column page c is a_pages[j * (in_f / page) + c]
// A slot's kernels get `seg_base`, the offset of its run table. Tokens of one run are
// contiguous, so a prefill run is Punica's SGMV and a decode batch of one token per run is BGMV;
// the same two kernels serve both.

// shrink: tmp[t, j] = scale · x[t, :] · A[j, :]; grid (tokens, max_rank), one block per value.
template <int DT>
__device__ void lora_shrink(const float* x, int in_f, const u32* meta, u32 seg_base, const u64* chunks, u32 per_chunk,
                            int page, float* tmp, int max_rank) {
    const int t = blockIdx.x, j = blockIdx.y;
    const u32 seg = meta[t];
    if (seg == NO_SEGMENT) return;
    const u32* s = meta + seg_base + (size_t)seg * 4;
    if (j >= (int)s[0]) return;
    const u32* a_pages = meta + s[2] + (size_t)j * (in_f / page);
    const float* xt = x + (size_t)t * in_f;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < in_f; i += blockDim.x) {
        const void* p = chunk_ptr<char>(chunks, a_pages[i / page], per_chunk, (size_t)page * (DT == 0 ? 4 : 2));
        sum += xt[i] * load_as_f32<DT>(p, i % page);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) tmp[(size_t)t * max_rank + j] = sum * __uint_as_float(s[1]);
}

// expand: y[t, o] += Σ_j tmp[t, j] · Bᵀ[j, o]; grid (tokens, ceil(out_f / blockDim.x)).
template <int DT>
__device__ void lora_expand(const float* tmp, int max_rank, const u32* meta, u32 seg_base, const u64* chunks,
                            u32 per_chunk, int page, float* y, int out_f) {
    const int t = blockIdx.x, o = blockIdx.y * blockDim.x + threadIdx.x;
    const u32 seg = meta[t];
    if (seg == NO_SEGMENT || o >= out_f) return;
    const u32* s = meta + seg_base + (size_t)seg * 4;
    const int rank = (int)s[0];
    if (rank == 0) return;
    const u32* b_pages = meta + s[3];
    const int row_pages = out_f / page;
    float acc = 0.0f;
    for (int j = 0; j < rank; j++) {
        const void* p = chunk_ptr<char>(chunks, b_pages[j * row_pages + o / page], per_chunk,
                                        (size_t)page * (DT == 0 ? 4 : 2));
        acc += tmp[(size_t)t * max_rank + j] * load_as_f32<DT>(p, o % page);
    }
    y[(size_t)t * out_f + o] += acc;
}

extern "C" __global__ void lora_shrink_f32(const float* x, int in_f, const u32* meta, u32 seg_base, const u64* chunks,
                                           u32 per_chunk, int page, float* tmp, int max_rank) {
    lora_shrink<0>(x, in_f, meta, seg_base, chunks, per_chunk, page, tmp, max_rank);
}
extern "C" __global__ void lora_shrink_bf16(const float* x, int in_f, const u32* meta, u32 seg_base, const u64* chunks,
                                            u32 per_chunk, int page, float* tmp, int max_rank) {
    lora_shrink<1>(x, in_f, meta, seg_base, chunks, per_chunk, page, tmp, max_rank);
}
extern "C" __global__ void lora_expand_f32(const float* tmp, int max_rank, const u32* meta, u32 seg_base,
                                           const u64* chunks, u32 per_chunk, int page, float* y, int out_f) {
    lora_expand<0>(tmp, max_rank, meta, seg_base, chunks, per_chunk, page, y, out_f);
}
extern "C" __global__ void lora_expand_bf16(const float* tmp, int max_rank, const u32* meta, u32 seg_base,
                                            const u64* chunks, u32 per_chunk, int page, float* y, int out_f) {
    lora_expand<1>(tmp, max_rank, meta, seg_base, chunks, per_chunk, page, y, out_f);
}

// Copies staged pages (already in the pool's dtype, back to back) to their ids; grid (pages).
extern "C" __global__ void scatter_pages(const char* staged, const u32* ids, const u64* chunks, u32 per_chunk,
                                         int page_bytes) {
    const char* src = staged + (size_t)blockIdx.x * page_bytes;
    char* dst = chunk_ptr<char>(chunks, ids[blockIdx.x], per_chunk, page_bytes);
    for (int i = threadIdx.x; i < page_bytes; i += blockDim.x) dst[i] = src[i];
}
