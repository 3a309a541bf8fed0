// Free-run statistics of a block-state bitmap (1 byte a block, nonzero = used): free blocks, runs of
// consecutive free blocks, and the largest run (see reference.free_run_stats).
//
// A thread reads FR_BYTES consecutive bytes with 16-byte loads (all issued before any arithmetic), turns
// each 64 of them into a 64-bit free mask and summarises it with bit counts (RunSummary: length, free
// count, runs, free prefix and suffix lengths, largest run inside). Summaries combine associatively in
// block order: across a warp by shuffles, across the CTA's warps in shared memory, and across CTAs by
// free_runs_finish (one CTA of 1024 threads over the per-CTA partials: a serial loop of 256 threads
// over them took a sixth of the scan at 256M blocks).

struct RunSummary {
  long long len, nfree, runs, pre, suf, best;
};

__device__ __forceinline__ RunSummary rs_combine(const RunSummary &a, const RunSummary &b) {
  if (a.len == 0) return b;
  if (b.len == 0) return a;
  RunSummary r;
  r.len = a.len + b.len;
  r.nfree = a.nfree + b.nfree;
  const bool join = a.suf > 0 && b.pre > 0;
  r.runs = a.runs + b.runs - (join ? 1 : 0);
  r.pre = (a.pre == a.len) ? a.len + b.pre : a.pre;
  r.suf = (b.suf == b.len) ? b.len + a.suf : b.suf;
  r.best = max(max(a.best, b.best), a.suf + b.pre);
  return r;
}

#define FR_THREADS 256
#define FR_FINISH_THREADS 1024

// Summary of `len` (1..64) blocks whose free bits are m (bit i = block i, 1 = free; bits >= len zero).
__device__ __forceinline__ RunSummary rs_of_mask(u64 m, int len) {
  RunSummary r;
  r.len = len;
  r.nfree = __popcll(m);
  r.runs = __popcll(m & ~(m << 1));                  // a run starts where the block before is not free
  const u64 inv = ~m;                                // has bit len set when len < 64
  r.pre = inv == 0 ? 64 : __ffsll((long long)inv) - 1;
  const u64 top = m << (64 - len);                   // the len blocks aligned to the top bit (len >= 1)
  r.suf = __clzll((long long)~top);                  // the zeros shifted in stop the count at len
  int best = 0;
  for (u64 x = m; x; x &= x >> 1) ++best;            // the longest run survives the most shifts
  r.best = best;
  return r;
}

// Free bits of 16 bytes (bit i set when byte i is zero).
__device__ __forceinline__ u32 free_bits16(const uint4 &v) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  u32 bits = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 z = __vcmpeq4(w[i], 0u);                         // 0xff in every zero byte
    bits |= (((z & 0x01010101u) * 0x10204080u) >> 28) << (4 * i);   // one bit a byte, byte order kept
  }
  return bits;
}

__device__ __forceinline__ RunSummary rs_shfl_down(const RunSummary &r, int off) {
  RunSummary o;
  o.len = __shfl_down_sync(0xffffffffu, r.len, off);
  o.nfree = __shfl_down_sync(0xffffffffu, r.nfree, off);
  o.runs = __shfl_down_sync(0xffffffffu, r.runs, off);
  o.pre = __shfl_down_sync(0xffffffffu, r.pre, off);
  o.suf = __shfl_down_sync(0xffffffffu, r.suf, off);
  o.best = __shfl_down_sync(0xffffffffu, r.best, off);
  return o;
}

// A warp's summaries combined in lane order; the result is valid in lane 0.
__device__ __forceinline__ RunSummary rs_warp_combine(RunSummary r) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {             // lane l ends up with lanes l .. l + 2*off - 1
    const RunSummary o = rs_shfl_down(r, off);
    if ((lane & (2 * off - 1)) == 0) r = rs_combine(r, o);
  }
  return r;
}

// The CTA's summaries combined in thread order; the result is valid in thread 0.
__device__ RunSummary rs_block_combine(RunSummary r) {
  __shared__ RunSummary s_warp[FR_THREADS / 32];
  const int warp = threadIdx.x >> 5;
  r = rs_warp_combine(r);
  if ((threadIdx.x & 31) == 0) s_warp[warp] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    r = s_warp[0];
    for (int w = 1; w < FR_THREADS / 32; ++w) r = rs_combine(r, s_warp[w]);
  }
  return r;
}

// VECS 16-byte loads a thread: 32 for large bitmaps (half the partials), 16 for small ones (more CTAs).
template <int VECS>
__global__ void __launch_bounds__(FR_THREADS) free_runs_partial(
    const unsigned char *__restrict__ used, long long n, RunSummary *__restrict__ partial)
{
  constexpr int FR_VECS = VECS, FR_BYTES = VECS * 16;   // bytes (blocks) per thread
  const long long start = ((long long)blockIdx.x * FR_THREADS + threadIdx.x) * FR_BYTES;
  RunSummary r = {0, 0, 0, 0, 0, 0};
  if (start + FR_BYTES <= n && (((u64)(used + start)) & 15) == 0) {
    uint4 v[FR_VECS];
#pragma unroll
    for (int i = 0; i < FR_VECS; ++i) v[i] = ldg16(used + start + 16 * i);
#pragma unroll
    for (int i = 0; i < FR_VECS; i += 4) {
      const u64 m = (u64)free_bits16(v[i]) | ((u64)free_bits16(v[i + 1]) << 16) |
                    ((u64)free_bits16(v[i + 2]) << 32) | ((u64)free_bits16(v[i + 3]) << 48);
      r = rs_combine(r, rs_of_mask(m, 64));
    }
  } else if (start < n) {                                // the tail, or an unaligned bitmap: byte loads
    const int len = (int)min((long long)FR_BYTES, n - start);
    for (int b0 = 0; b0 < len; b0 += 64) {
      const int l = min(64, len - b0);
      u64 m = 0;
      for (int i = 0; i < l; ++i) m |= (u64)(used[start + b0 + i] == 0) << i;
      r = rs_combine(r, rs_of_mask(m, l));
    }
  }
  r = rs_block_combine(r);
  if (threadIdx.x == 0) partial[blockIdx.x] = r;
}

__global__ void __launch_bounds__(FR_FINISH_THREADS) free_runs_finish(
    const RunSummary *__restrict__ partial, int nparts, long long *__restrict__ result)  // [3]
{
  // each thread combines a consecutive slice of the partials (loads four at a time, all in flight), then
  // the slices combine across each warp and across the warps in warp 0
  __shared__ RunSummary s_warp[FR_FINISH_THREADS / 32];
  const int per = (nparts + FR_FINISH_THREADS - 1) / FR_FINISH_THREADS;
  const int i0 = threadIdx.x * per, i1 = min(nparts, i0 + per);
  RunSummary r = {0, 0, 0, 0, 0, 0};
  for (int i = i0; i < i1; i += 4) {
    RunSummary q[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) q[k] = i + k < i1 ? partial[i + k] : RunSummary{0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int k = 0; k < 4; ++k) r = rs_combine(r, q[k]);
  }
  r = rs_warp_combine(r);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_warp[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = s_warp[lane];                                   // FR_FINISH_THREADS / 32 == 32 warps
    r = rs_warp_combine(r);
    if (lane == 0) { result[0] = r.nfree; result[1] = r.runs; result[2] = r.best; }
  }
}
