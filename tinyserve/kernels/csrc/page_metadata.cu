// Per-block key min/max metadata maintained on KV write (see reference.update_page_metadata).
//
// Two launches per write: page_metadata_reset sets the metadata of every block that receives a token at
// offset 0 to (+inf, -inf); page_metadata_merge then folds every written key into its block's min/max
// with 32-bit compare-and-swap on pairs of 16-bit channels, so tokens of one block written in the same
// call (prefill) merge exactly in any order. Each thread pre-reduces CHUNK consecutive tokens in
// registers before its compare-and-swap: 16 for prefills (fewer atomics on one block's words), 1 for
// small writes such as a decode step, whose tokens go to different blocks (no serial chain of atomics
// per thread). Negative slots are padding.

template <typename T>
__global__ void page_metadata_reset(const long long *__restrict__ slots, int ntok, int bs, int words,
                                    u32 *__restrict__ kmin, u32 *__restrict__ kmax)
{
  // grid (ntok), blockDim threads over the block's Hkv*D/2 words
  const long long s = slots[blockIdx.x];
  if (s < 0 || (s % bs) != 0) return;
  const long long blk = s / bs;
  const u32 pinf = ((u32)Elt<T>::from(TS_POS_INF)) * 0x10001u;
  const u32 ninf = ((u32)Elt<T>::from(TS_NEG_INF)) * 0x10001u;
  for (int w = threadIdx.x; w < words; w += blockDim.x) {
    kmin[blk * words + w] = pinf;
    kmax[blk * words + w] = ninf;
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
  const float alo = Elt<T>::one((u16)(a & 0xffffu)), ahi = Elt<T>::one((u16)(a >> 16));
  const float blo = Elt<T>::one((u16)(b & 0xffffu)), bhi = Elt<T>::one((u16)(b >> 16));
  const bool lo = IS_MAX ? (blo > alo) : (blo < alo);
  const bool hi = IS_MAX ? (bhi > ahi) : (bhi < ahi);
  return (lo ? (b & 0xffffu) : (a & 0xffffu)) | (hi ? (b & 0xffff0000u) : (a & 0xffff0000u));
}

template <typename T, int CHUNK>
__global__ void page_metadata_merge(const u32 *__restrict__ key, const long long *__restrict__ slots,
                                    int ntok, int bs, int words, u32 *__restrict__ kmin, u32 *__restrict__ kmax)
{
  // grid-stride over (chunk of CHUNK consecutive tokens) x words; a thread reduces its chunk in
  // registers while the block id stays the same (prefill writes a block's tokens consecutively) and
  // flushes each block's partial min/max with compare-and-swap. key [T, Hkv, D] contiguous.
  const int nchunks = (ntok + CHUNK - 1) / CHUNK;
  const long long total = (long long)nchunks * words;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i / words);
    const int w = (int)(i - (long long)c * words);
    const int t1 = min(ntok, (c + 1) * CHUNK);
    long long cur = -1;
    u32 mn = 0, mx = 0;
    for (int t = c * CHUNK; t < t1; ++t) {
      const long long s = slots[t];
      if (s < 0) continue;
      const long long blk = s / bs;
      const u32 v = key[(size_t)t * words + w];
      if (blk != cur) {
        if (cur >= 0) {
          cas_pair<T, false>(kmin + cur * words + w, mn);
          cas_pair<T, true>(kmax + cur * words + w, mx);
        }
        cur = blk; mn = v; mx = v;
      } else {
        mn = pair_pick<T, false>(mn, v);
        mx = pair_pick<T, true>(mx, v);
      }
    }
    if (cur >= 0) {
      cas_pair<T, false>(kmin + cur * words + w, mn);
      cas_pair<T, true>(kmax + cur * words + w, mx);
    }
  }
}
