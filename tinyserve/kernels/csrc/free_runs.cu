// Free-run statistics of a block-state bitmap (1 byte a block, nonzero = used): free blocks, runs of
// consecutive free blocks, and the largest run (see reference.free_run_stats).
//
// Every CTA summarises its contiguous slice as a RunSummary (length, free count, runs, free prefix and
// suffix lengths, largest run inside); the summaries combine associatively in slice order, inside a CTA
// by a shared-memory tree and across CTAs by free_runs_finish (one CTA).

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
#define FR_PER_THREAD 16

__device__ void rs_tree(RunSummary *s) {
  for (int stride = 1; stride < FR_THREADS; stride <<= 1) {
    __syncthreads();
    if ((threadIdx.x % (2 * stride)) == 0) s[threadIdx.x] = rs_combine(s[threadIdx.x], s[threadIdx.x + stride]);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(FR_THREADS) free_runs_partial(
    const unsigned char *__restrict__ used, long long n, RunSummary *__restrict__ partial)
{
  __shared__ RunSummary s[FR_THREADS];
  const long long start = ((long long)blockIdx.x * FR_THREADS + threadIdx.x) * FR_PER_THREAD;
  RunSummary r = {0, 0, 0, 0, 0, 0};
  if (start < n) {
    unsigned char v[FR_PER_THREAD];
    if (start + FR_PER_THREAD <= n && (((u64)(used + start)) & 15) == 0) {
      uint4 raw = ldg16(used + start);
      const unsigned char *pb = reinterpret_cast<const unsigned char *>(&raw);
#pragma unroll
      for (int i = 0; i < FR_PER_THREAD; ++i) v[i] = pb[i];
    } else {
#pragma unroll
      for (int i = 0; i < FR_PER_THREAD; ++i) v[i] = (start + i < n) ? used[start + i] : 1;
    }
    const int len = (int)min((long long)FR_PER_THREAD, n - start);
    long long cur = 0;
    bool seen_used = false;
    r.len = len;
    for (int i = 0; i < len; ++i) {
      if (v[i] == 0) {
        if (cur == 0) r.runs++;
        cur++; r.nfree++;
        if (cur > r.best) r.best = cur;
        if (!seen_used) r.pre = cur;
      } else {
        seen_used = true; cur = 0;
      }
    }
    r.suf = cur;
  }
  s[threadIdx.x] = r;
  rs_tree(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

__global__ void __launch_bounds__(FR_THREADS) free_runs_finish(
    const RunSummary *__restrict__ partial, int nparts, long long *__restrict__ result)  // [3]
{
  __shared__ RunSummary s[FR_THREADS];
  const int per = (nparts + FR_THREADS - 1) / FR_THREADS;
  RunSummary r = {0, 0, 0, 0, 0, 0};
  for (int i = threadIdx.x * per; i < min(nparts, (threadIdx.x + 1) * per); ++i) r = rs_combine(r, partial[i]);
  s[threadIdx.x] = r;
  rs_tree(s);
  if (threadIdx.x == 0) { result[0] = s[0].nfree; result[1] = s[0].runs; result[2] = s[0].best; }
}
