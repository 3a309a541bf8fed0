// Per-block key min/max metadata maintained on KV write (see reference.update_page_metadata).
//
// Two launches per write: page_metadata_reset sets the metadata of every block that receives a token at
// offset 0 to (+inf, -inf); page_metadata_merge then folds every written key into its block's min/max
// with 32-bit compare-and-swap on pairs of 16-bit channels, so tokens of one block written in the same
// call (prefill) merge exactly in any order. Negative slots are padding.

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

template <typename T>
__global__ void page_metadata_merge(const u32 *__restrict__ key, const long long *__restrict__ slots,
                                    int ntok, int bs, int words, u32 *__restrict__ kmin, u32 *__restrict__ kmax)
{
  // grid-stride over ntok * words (words = Hkv*D/2 per token); key [T, Hkv, D] contiguous
  const long long total = (long long)ntok * words;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long t = i / words;
    const int w = (int)(i - t * words);
    const long long s = slots[t];
    if (s < 0) continue;
    const long long blk = s / bs;
    const u32 v = key[i];
    cas_pair<T, false>(kmin + blk * words + w, v);
    cas_pair<T, true>(kmax + blk * words + w, v);
  }
}
