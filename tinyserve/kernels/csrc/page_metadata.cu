// Per-block key min/max metadata maintained on KV write (see reference.update_page_metadata).
//
// Two launches per write: page_metadata_reset sets the metadata of every block that receives a token at
// offset 0 to (+inf, -inf) (a warp per token); page_metadata_merge then folds every written key into its
// block's min/max with 32-bit compare-and-swap on pairs of 16-bit channels, so tokens of one block written
// in the same call (prefill) merge exactly in any order. Each thread pre-reduces CHUNK consecutive tokens
// in registers before its compare-and-swap (a plain store when the chunk is exactly one whole block): 16
// for prefills (fewer atomics on one block's words), 1 for small writes such as a decode step, whose tokens
// go to different blocks (no serial chain of atomics per thread). Negative slots are padding.

template <typename T>
__global__ void page_metadata_reset(const long long *__restrict__ slots, int ntok, int bs, int words,
                                    u32 *__restrict__ kmin, u32 *__restrict__ kmax)
{
  // one warp per token (grid-stride over tokens): a token at offset 0 resets its block's Hkv*D/2 words.
  // (A CTA per token made a 32k-token prefill launch 32k mostly idle CTAs.)
  const int lane = threadIdx.x & 31;
  const u32 pinf = ((u32)Elt<T>::from(TS_POS_INF)) * 0x10001u;
  const u32 ninf = ((u32)Elt<T>::from(TS_NEG_INF)) * 0x10001u;
  const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  for (long long t = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < ntok; t += warps) {
    const long long s = slots[t];
    if (s < 0 || (s % bs) != 0) continue;
    const long long blk = s / bs;
    for (int w = lane; w < words; w += 32) {
      kmin[blk * words + w] = pinf;
      kmax[blk * words + w] = ninf;
    }
  }
}

template <typename T, bool IS_MAX>
__device__ __forceinline__ void cas_pair(u32 *addr, u32 val) {
  const float vlo = Elt<T>::one((u16)(val & 0xffffu)), vhi = Elt<T>::one((u16)(val >> 16));
  u32 old = *addr;
  while (true) {
    float olo = Elt<T>::one((u16)(old & 0xffffu)), ohi = Elt<T>::one((u16)(old >> 16));
    bool rlo = IS_MAX ? (vlo > olo) : (vlo < olo);
    bool rhi = IS_MAX ? (vhi > ohi) : (vhi < ohi);
    if (!rlo && !rhi) return;
    u32 nw = (rlo ? (val & 0xffffu) : (old & 0xffffu)) | (rhi ? (val & 0xffff0000u) : (old & 0xffff0000u));
    u32 prev = atomicCAS(addr, old, nw);
    if (prev == old) return;
    old = prev;
  }
}

template <typename T, bool IS_MAX>
__device__ __forceinline__ u32 pair_pick(u32 a, u32 b) {   // elementwise min/max of two 16-bit pairs
#if __CUDA_ARCH__ >= 800   // one packed instruction (the unpacked compares made 32k-token prefills compute-bound)
  u32 r;
  if constexpr (Elt<T>::is_bf16) {
    if constexpr (IS_MAX) asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    else asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else {
    if constexpr (IS_MAX) asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    else asm("min.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
  return r;
#else
  const float alo = Elt<T>::one((u16)(a & 0xffffu)), ahi = Elt<T>::one((u16)(a >> 16));
  const float blo = Elt<T>::one((u16)(b & 0xffffu)), bhi = Elt<T>::one((u16)(b >> 16));
  const bool lo = IS_MAX ? (blo > alo) : (blo < alo);
  const bool hi = IS_MAX ? (bhi > ahi) : (bhi < ahi);
  return (lo ? (b & 0xffffu) : (a & 0xffffu)) | (hi ? (b & 0xffff0000u) : (a & 0xffff0000u));
#endif
}

// VEC words (1, or 4 = one 16-byte load) of `key` starting at word index `at`.
template <int VEC>
__device__ __forceinline__ void load_words(const u32 *__restrict__ key, size_t at, u32 (&v)[VEC]) {
  if constexpr (VEC == 4) {
    const uint4 q = ldg16(key + at);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = key[at + e];
  }
}

// Fold partial min / max words mn, mx (VEC pairs of 16-bit channels) into kmin / kmax at `at`, by
// compare-and-swap (other threads may write the same words in this call).
template <typename T, int VEC>
__device__ __forceinline__ void merge_words(u32 *kmin, u32 *kmax, long long at, const u32 (&mn)[VEC],
                                            const u32 (&mx)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    cas_pair<T, false>(kmin + at + e, mn[e]);
    cas_pair<T, true>(kmax + at + e, mx[e]);
  }
}

template <typename T, int CHUNK, int VEC>
__global__ void page_metadata_merge(const u32 *__restrict__ key, const long long *__restrict__ slots,
                                    int ntok, int bs, int bs_shift, int words, u32 *__restrict__ kmin,
                                    u32 *__restrict__ kmax)
{
  // grid-stride over (chunk of CHUNK consecutive tokens) x (VEC consecutive words); a thread loads its
  // chunk's slots and keys first (all loads in flight together; block ids by shift when bs_shift >= 0,
  // bs a power of two), then reduces them in registers while the block id stays the same (prefill writes
  // a block's tokens consecutively) and flushes each block's partial min/max with compare-and-swap, word
  // by word. key [T, Hkv, D]; words (= Hkv*D/2) a multiple of VEC, 16-byte aligned rows when VEC = 4.
  const int nchunks = (ntok + CHUNK - 1) / CHUNK;
  const int groups = words / VEC;
  const long long total = (long long)nchunks * groups;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i / groups);
    const int w = (int)(i - (long long)c * groups) * VEC;
    long long blk[CHUNK];
    u32 v[CHUNK][VEC];
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) {
      const int t = c * CHUNK + u;
      const long long s = t < ntok ? slots[t] : -1;
      blk[u] = s < 0 ? -1 : (bs_shift >= 0 ? s >> bs_shift : s / bs);
      if (s >= 0) load_words<VEC>(key, (size_t)t * words + w, v[u]);
    }
    // The chunk is a whole block (every token of it, nothing else): no other thread writes these words in
    // this call, and the reset already ran, so plain stores replace the compare-and-swaps.
    bool whole = bs == CHUNK && blk[0] >= 0;
#pragma unroll
    for (int u = 1; u < CHUNK; ++u) whole = whole && blk[u] == blk[0];
    long long cur = -1;
    u32 mn[VEC], mx[VEC];
#pragma unroll
    for (int u = 0; u < CHUNK; ++u) {
      if (blk[u] < 0) continue;
      if (blk[u] != cur) {
        if (cur >= 0) merge_words<T, VEC>(kmin, kmax, cur * words + w, mn, mx);
        cur = blk[u];
#pragma unroll
        for (int e = 0; e < VEC; ++e) { mn[e] = v[u][e]; mx[e] = v[u][e]; }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          mn[e] = pair_pick<T, false>(mn[e], v[u][e]);
          mx[e] = pair_pick<T, true>(mx[e], v[u][e]);
        }
      }
    }
    if (whole) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        kmin[cur * words + w + e] = mn[e];
        kmax[cur * words + w + e] = mx[e];
      }
    } else if (cur >= 0) {
      merge_words<T, VEC>(kmin, kmax, cur * words + w, mn, mx);
    }
  }
}
