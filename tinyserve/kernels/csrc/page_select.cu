// Query-aware page scoring and top-k page selection (see reference.page_scores / select_pages).
//
// page_scores: grid (ceil(P / PAGES_PER_CTA), Hkv, B), 256 threads; a group of D/8 lanes scores one page
// from its min/max metadata: score = qpos . max + qneg . min, where qpos / qneg are the sums over the
// KV head's query heads of relu(q) and min(q, 0) (equal to sum_g sum_c max(q*min, q*max)).
// Pages past the sequence get -inf.
//
// select_pages: grid (Hkv, B), 512 threads. Keeps sinks and the last page, and the `need` best of the
// others by an MSB-first radix select on order-preserving 32-bit keys (4 passes of 8 bits, histograms in
// shared memory), then writes the chosen pages in ascending order with a block-wide prefix count
// (ties at the threshold go to the lowest page indices). NaN scores rank lowest.

#define SCORE_PAGES_PER_CTA 128

// Per KV head h of sequence b, this lane's 8 channels (lane * 8 ..) of the sums over the group's query
// heads of relu(q) (qp) and min(q, 0) (qn).
template <typename T, int D, int G>
__device__ __forceinline__ void group_query_parts(const u16 *__restrict__ q, int b, int h, int hkv, int lane,
                                                  float (&qp)[8], float (&qn)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) { qp[e] = 0.f; qn[e] = 0.f; }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float f[8];
    unpack8<T>(ldg16(q + ((size_t)b * hkv * G + (size_t)h * G + g) * D + lane * 8), f);
#pragma unroll
    for (int e = 0; e < 8; ++e) { qp[e] += fmaxf(f[e], 0.f); qn[e] += fminf(f[e], 0.f); }
  }
}

// Score of one page by a group of LANES lanes (each holding 8 channels of min and max); every lane of the
// warp must call it (shuffles); lanes with live = false contribute 0. Same arithmetic in every kernel.
template <typename T, int LANES>
__device__ __forceinline__ float page_score(const uint4 &rmin, const uint4 &rmax, const float (&qp)[8],
                                            const float (&qn)[8], bool live) {
  float s = 0.f;
  if (live) {
    float fmn[8], fmx[8];
    unpack8<T>(rmin, fmn);
    unpack8<T>(rmax, fmx);
#pragma unroll
    for (int e = 0; e < 8; ++e) s = fmaf(qp[e], fmx[e], fmaf(qn[e], fmn[e], s));
  }
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(256) page_scores(
    const u16 *__restrict__ q, const u16 *__restrict__ kmin, const u16 *__restrict__ kmax,
    const int *__restrict__ bt, const int *__restrict__ seq_lens, int bt_stride, int max_pages,
    int hkv, int bs_shift, float *__restrict__ scores)   // [B, Hkv, max_pages]
{
  constexpr int LANES = D / 8;
  constexpr int GPC = 256 / LANES;   // pages scored in parallel by the CTA
  const int h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x % LANES, pg = threadIdx.x / LANES;
  const int npages = (seq_lens[b] + (1 << bs_shift) - 1) >> bs_shift;
  float qp[8], qn[8];
  group_query_parts<T, D, G>(q, b, h, hkv, lane, qp, qn);
  const int first = blockIdx.x * SCORE_PAGES_PER_CTA;
  constexpr int ITER = SCORE_PAGES_PER_CTA / GPC;
  uint4 rmin[ITER], rmax[ITER];
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    int p = first + it * GPC + pg;
    if (p < npages) {
      size_t off = ((size_t)bt[(size_t)b * bt_stride + p] * hkv + h) * D + lane * 8;
      rmin[it] = ldg16(kmin + off);
      rmax[it] = ldg16(kmax + off);
    }
  }
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    int p = first + it * GPC + pg;
    const float s = page_score<T, LANES>(rmin[it], rmax[it], qp, qn, p < npages);
    if (lane == 0 && p < max_pages)
      scores[((size_t)b * hkv + h) * max_pages + p] = (p < npages) ? s : TS_NEG_INF;
  }
}

__device__ __forceinline__ u32 order_key(float f) {
  u32 u = __float_as_uint(f);
  if (f != f) return 0u;                       // NaN ranks lowest
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define SEL_THREADS 512
#define SEL_SMEM_KEYS 8192

// Block-wide exclusive prefix count of `flag` over NT threads; returns this thread's prefix, total via *total.
template <int NT>
__device__ __forceinline__ int block_prefix(bool flag, int *s_warp, int *total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u32 bal = __ballot_sync(0xffffffffu, flag);
  int before = __popc(bal & ((1u << lane) - 1u));
  if (lane == 0) s_warp[warp] = __popc(bal);
  __syncthreads();
  if (warp == 0) {
    int v = lane < (NT / 32) ? s_warp[lane] : 0;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    if (lane < (NT / 32)) s_warp[lane] = incl - v;
    if (lane == (NT / 32) - 1) s_warp[32] = incl;
  }
  __syncthreads();
  int r = s_warp[warp] + before;
  *total = s_warp[32];
  __syncthreads();
  return r;
}

// The `need` best candidates [c0, c1) by key (from s_keys when cached, else from sc), plus the pages
// outside [c0, c1) (sinks and the last page), written ascending to out[0..k), -1 padded; count to
// *nsel_row. Called by all NT threads of the block; keys must be visible (after a barrier).
template <int NT>
__device__ void select_core(const u32 *s_keys, bool cached, const float *sc, int npages, int c0, int c1,
                            int need, int k, int *__restrict__ out, int *__restrict__ nsel_row, int *s_hist,
                            int *s_warp, u32 *s_prefix, u32 *s_remaining) {
  const int tid = threadIdx.x;
  if (tid == 0) { *s_prefix = 0u; *s_remaining = (u32)need; }
  __syncthreads();

  u32 mask = 0u;
  if (need > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int j = tid; j < 256; j += NT) s_hist[j] = 0;
      __syncthreads();
      const u32 prefix = (*s_prefix);
      for (int j0 = 0; j0 < c1 - c0; j0 += NT) {   // warp-uniform trip count (match_any)
        const int j = j0 + tid;
        u32 digit = 256u;                                     // 256: not counted
        if (j < c1 - c0) {
          const u32 key = cached ? s_keys[j] : order_key(sc[c0 + j]);
          if ((key & mask) == prefix) digit = (key >> shift) & 0xffu;
        }
        const u32 peers = __match_any_sync(0xffffffffu, digit);
        if (digit < 256u && (tid & 31) == __ffs(peers) - 1) atomicAdd(&s_hist[digit], __popc(peers));
      }
      __syncthreads();
      if (tid < 32) {                    // find the digit holding the remaining-th largest key
        const u32 rem = (*s_remaining);
        int cnt = 0;                     // lane owns digits 255-8*lane .. 248-8*lane
#pragma unroll
        for (int i = 0; i < 8; ++i) cnt += s_hist[255 - 8 * tid - i];
        int incl = cnt;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          int n = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += n;
        }
        int excl = incl - cnt;
        if ((u32)excl < rem && rem <= (u32)incl) {
          int run = excl;
          for (int i = 0; i < 8; ++i) {
            int dgt = 255 - 8 * tid - i;
            int c = s_hist[dgt];
            if ((u32)(run + c) >= rem) {
              (*s_prefix) = prefix | ((u32)dgt << shift);
              (*s_remaining) = rem - (u32)run;
              break;
            }
            run += c;
          }
        }
      }
      mask |= 0xffu << shift;
      __syncthreads();
    }
  }
  const u32 thresh = (*s_prefix);
  const int ties = need > 0 ? (int)(*s_remaining) : 0;
  int written = 0, ties_seen = 0;
  for (int base = 0; base < npages; base += NT) {
    const int p = base + tid;
    bool in = p < npages;
    bool take = false, tie = false;
    if (in) {
      if (p < c0 || p == c1) {
        take = true;
      } else if (need > 0) {
        u32 key = cached ? s_keys[p - c0] : order_key(sc[p]);
        take = key > thresh;
        tie = key == thresh;
      }
    }
    int tie_total;
    int tie_rank = ties_seen + block_prefix<NT>(tie, s_warp, &tie_total);
    take = take || (tie && tie_rank < ties);
    ties_seen += tie_total;
    int tot;
    int pos = written + block_prefix<NT>(take, s_warp, &tot);
    if (take) out[pos] = p;
    written += tot;
  }
  for (int j = written + tid; j < k; j += NT) out[j] = -1;
  if (tid == 0) *nsel_row = written;
}

__global__ void __launch_bounds__(SEL_THREADS) select_pages(
    const float *__restrict__ scores, const int *__restrict__ seq_lens, int max_pages, int hkv,
    int bs_shift, int k, int num_sinks, int *__restrict__ sel, int *__restrict__ nsel)
{
  __shared__ u32 s_keys[SEL_SMEM_KEYS];
  __shared__ int s_hist[256];
  __shared__ int s_warp[33];
  __shared__ u32 s_prefix, s_remaining;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const size_t row = (size_t)b * hkv + h;
  const float *sc = scores + row * max_pages;
  int *out = sel + row * k;
  const int npages = (seq_lens[b] + (1 << bs_shift) - 1) >> bs_shift;

  if (npages <= k) {                     // everything fits: all pages, dense-equivalent
    for (int j = tid; j < k; j += SEL_THREADS) out[j] = j < npages ? j : -1;
    if (tid == 0) nsel[row] = npages;
    return;
  }
  const int c0 = num_sinks, c1 = npages - 1;    // candidates [c0, c1); sinks < npages - 1 here
  const bool cached = (c1 - c0) <= SEL_SMEM_KEYS;
  if (cached)
    for (int j = tid; j < c1 - c0; j += SEL_THREADS) s_keys[j] = order_key(sc[c0 + j]);
  select_core<SEL_THREADS>(s_keys, cached, sc, npages, c0, c1, k - num_sinks - 1, k, out, nsel + row, s_hist, s_warp,
              &s_prefix, &s_remaining);
}

// Fused scoring and selection (one launch): grid (Hkv, B), SEL_THREADS threads. The block scores every
// candidate page of its (sequence, KV head) from the min/max metadata with the same arithmetic as
// page_scores (groups of D/8 lanes, SCORE_UNROLL pages per group in flight), keeps the order keys in
// shared memory and runs select_core on them. Needs at most SEL_SMEM_KEYS candidates (pages - 2).
#define SCORE_UNROLL 8

// Scores of the pages first + u * GPC + pg (u < U, GPC = NT / (D/8)) below `end`, by groups of D/8 lanes
// with page_scores' arithmetic; all loads are issued before any arithmetic. Every thread of the block (NT
// threads) calls it.
template <typename T, int D, int NT = SEL_THREADS, int U = SCORE_UNROLL>
__device__ __forceinline__ void score_page_batch(const u16 *__restrict__ kmin, const u16 *__restrict__ kmax,
                                                 const int *__restrict__ btr, int h, int hkv, int first, int end,
                                                 const float (&qp)[8], const float (&qn)[8], float (&s)[U]) {
  constexpr int LANES = D / 8;
  constexpr int GPC = NT / LANES;
  const int lane = threadIdx.x % LANES, pg = threadIdx.x / LANES;
  uint4 rmin[U], rmax[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int p = first + u * GPC + pg;
    if (p < end) {
      const size_t off = ((size_t)btr[p] * hkv + h) * D + lane * 8;
      rmin[u] = ldg16(kmin + off);
      rmax[u] = ldg16(kmax + off);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) s[u] = page_score<T, LANES>(rmin[u], rmax[u], qp, qn, first + u * GPC + pg < end);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(SEL_THREADS) score_select_pages(
    const u16 *__restrict__ q, const u16 *__restrict__ kmin, const u16 *__restrict__ kmax,
    const int *__restrict__ bt, const int *__restrict__ seq_lens, int bt_stride, int hkv, int bs_shift,
    int k, int num_sinks, int *__restrict__ sel, int *__restrict__ nsel)
{
  constexpr int LANES = D / 8;
  constexpr int GPC = SEL_THREADS / LANES;   // pages scored in parallel
  __shared__ u32 s_keys[SEL_SMEM_KEYS];
  __shared__ int s_hist[256];
  __shared__ int s_warp[33];
  __shared__ u32 s_prefix, s_remaining;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const size_t row = (size_t)b * hkv + h;
  int *out = sel + row * k;
  const int npages = (seq_lens[b] + (1 << bs_shift) - 1) >> bs_shift;

  if (npages <= k) {
    for (int j = tid; j < k; j += SEL_THREADS) out[j] = j < npages ? j : -1;
    if (tid == 0) nsel[row] = npages;
    return;
  }
  const int c0 = num_sinks, c1 = npages - 1;
  const int need = k - num_sinks - 1;
  if (need > 0) {
    const int lane = tid % LANES, pg = tid / LANES;
    float qp[8], qn[8];
    group_query_parts<T, D, G>(q, b, h, hkv, lane, qp, qn);
    const int *btr = bt + (size_t)b * bt_stride;
    for (int first = c0; first < c1; first += GPC * SCORE_UNROLL) {
      float s[SCORE_UNROLL];
      score_page_batch<T, D>(kmin, kmax, btr, h, hkv, first, c1, qp, qn, s);
#pragma unroll
      for (int u = 0; u < SCORE_UNROLL; ++u) {
        const int p = first + u * GPC + pg;
        if (lane == 0 && p < c1) s_keys[p - c0] = order_key(s[u]);
      }
    }
  }
  select_core<SEL_THREADS>(s_keys, true, nullptr, npages, c0, c1, need, k, out, nsel + row, s_hist, s_warp, &s_prefix,
              &s_remaining);
}

// Scoring spread over many blocks, selection by the last block of each row (one launch): grid
// (ceil(max_pages / (GPC * SCORE_UNROLL)), Hkv, B), SEL_THREADS threads. Each block scores its pages
// (page_scores' arithmetic) into `scores` [B, Hkv, max_pages]; the last block of a (sequence, KV head) to
// finish (atomic ticket in counters[row], reset to 0 by that block; counters start at 0, one launch at a
// time) reads the row back from L2 and runs select_core. Needs at most SEL_SMEM_KEYS candidates.
template <typename T, int D, int G>
__global__ void __launch_bounds__(SEL_THREADS) score_pages_select_last(
    const u16 *__restrict__ q, const u16 *__restrict__ kmin, const u16 *__restrict__ kmax,
    const int *__restrict__ bt, const int *__restrict__ seq_lens, int bt_stride, int max_pages, int hkv,
    int bs_shift, int k, int num_sinks, float *__restrict__ scores, int *__restrict__ counters,
    int *__restrict__ sel, int *__restrict__ nsel)
{
  constexpr int LANES = D / 8;
  constexpr int GPC = SEL_THREADS / LANES;
  constexpr int PPC = GPC * SCORE_UNROLL;     // pages a block scores
  __shared__ u32 s_keys[SEL_SMEM_KEYS];
  __shared__ int s_hist[256];
  __shared__ int s_warp[33];
  __shared__ u32 s_prefix, s_remaining;
  __shared__ int s_last;
  const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const size_t row = (size_t)b * hkv + h;
  const int npages = (seq_lens[b] + (1 << bs_shift) - 1) >> bs_shift;
  const int need = k - num_sinks - 1;
  const int first = blockIdx.x * PPC;
  float *sc = scores + row * max_pages;
  if (npages > k && need > 0 && first < npages) {
    const int lane = tid % LANES, pg = tid / LANES;
    float qp[8], qn[8];
    group_query_parts<T, D, G>(q, b, h, hkv, lane, qp, qn);
    const int *btr = bt + (size_t)b * bt_stride;
    float s[SCORE_UNROLL];
    score_page_batch<T, D>(kmin, kmax, btr, h, hkv, first, npages, qp, qn, s);
#pragma unroll
    for (int u = 0; u < SCORE_UNROLL; ++u) {
      const int p = first + u * GPC + pg;
      if (lane == 0 && p < npages) sc[p] = s[u];
    }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&counters[row], 1) == (int)gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (tid == 0) counters[row] = 0;
  int *out = sel + row * k;
  if (npages <= k) {
    for (int j = tid; j < k; j += SEL_THREADS) out[j] = j < npages ? j : -1;
    if (tid == 0) nsel[row] = npages;
    return;
  }
  const int c0 = num_sinks, c1 = npages - 1;
  if (need > 0)
    for (int j = tid; j < c1 - c0; j += SEL_THREADS) s_keys[j] = order_key(__ldcg(sc + c0 + j));
  select_core<SEL_THREADS>(s_keys, true, nullptr, npages, c0, c1, need, k, out, nsel + row, s_hist, s_warp, &s_prefix,
              &s_remaining);
}

// Scoring and selection inside the one-launch query-aware decode (paged_decode_mma with COOP = true), by
// the NT threads of one of the S CTAs of a (sequence, KV head) row: the CTA scores its share of the row's
// candidate pages (page_scores' arithmetic) into `sc` (the row's scores in global memory), the S CTAs meet
// at the row's barrier, and every CTA then selects the row's pages itself from the scores in L2
// (select_core; the same pages in every CTA and in every selection mode) into shared memory `s_sel` [k].
// Returns the number of pages selected; s_sel is visible to the whole block on return. Rows of at most NT
// candidates rank each candidate by counting the ones before it (the same pages as select_core).
//
// The barrier: `count` (0 between launches: the last CTA to arrive resets it) and `generation` (raised by
// that last CTA; the others wait for it to move). Waiting needs the row's S CTAs resident together: the
// host launches this only when the whole grid fits on the multiprocessors at once.
template <typename T, int D, int G, int NT>
__device__ int coop_select_row(const u16 *__restrict__ q, const u16 *__restrict__ kmin,
                               const u16 *__restrict__ kmax, const int *__restrict__ btr, int npages, int b,
                               int h, int hkv, int split, int S, int k, int num_sinks, float *sc,
                               unsigned *count, unsigned *generation, u32 *s_keys, int *s_sel) {
  __shared__ int s_hist[256];
  __shared__ int s_warp[33];
  __shared__ u32 s_prefix, s_remaining;
  __shared__ int s_n;
  const int tid = threadIdx.x;
  if (npages <= k) {                         // every page fits: the whole row, no scores needed
    for (int j = tid; j < k; j += NT) s_sel[j] = j < npages ? j : -1;
    __syncthreads();
    return npages;
  }
  const int c0 = num_sinks, c1 = npages - 1, need = k - num_sinks - 1;
  if (need > 0) {
    constexpr int LANES = D / 8, GPC = NT / LANES, U = 4;   // U pages a lane group has in flight
    const int lane = tid % LANES, pg = tid / LANES;
    const int share = (c1 - c0 + S - 1) / S;
    const int lo = c0 + split * share, hi = min(c1, lo + share);
    if (lo < hi) {
      float qp[8], qn[8];
      group_query_parts<T, D, G>(q, b, h, hkv, lane, qp, qn);
      for (int first = lo; first < hi; first += GPC * U) {
        float s[U];
        score_page_batch<T, D, NT, U>(kmin, kmax, btr, h, hkv, first, hi, qp, qn, s);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int p = first + u * GPC + pg;
          if (lane == 0 && p < hi) sc[p] = s[u];
        }
      }
    }
    __syncthreads();                         // the CTA's scores are written
    if (tid == 0) {
      unsigned gen;
      asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(gen) : "l"(generation));
      __threadfence();                       // the scores before the arrival
      if (atomicAdd(count, 1u) == (unsigned)S - 1) {
        *count = 0u;
        __threadfence();
        atomicAdd(generation, 1u);
      } else {
        unsigned now;
        do { asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(now) : "l"(generation)); } while (now == gen);
      }
      __threadfence();
    }
    __syncthreads();
    for (int j = tid; j < c1 - c0; j += NT) s_keys[j] = order_key(__ldcg(sc + c0 + j));
    if (c1 - c0 <= NT) {   // one candidate a thread: rank by count, one pass instead of four radix rounds
      __syncthreads();
      int written = 0;
      for (int base = 0; base < npages; base += NT) {
        const int p = base + tid;
        bool take = p < npages && (p < c0 || p == c1);
        if (p >= c0 && p < c1) {
          const u32 key = s_keys[p - c0];
          int ahead = 0;                     // candidates ranked before p: larger keys, ties at lower pages
          for (int j = 0; j < c1 - c0; ++j) {
            const u32 other = s_keys[j];
            ahead += other > key || (other == key && j < p - c0);
          }
          take = ahead < need;
        }
        int total;
        const int pos = written + block_prefix<NT>(take, s_warp, &total);
        if (take) s_sel[pos] = p;
        written += total;
      }
      for (int j = written + tid; j < k; j += NT) s_sel[j] = -1;
      __syncthreads();
      return written;
    }
  }
  select_core<NT>(s_keys, true, nullptr, npages, c0, c1, need, k, s_sel, &s_n, s_hist, s_warp, &s_prefix,
                  &s_remaining);
  __syncthreads();
  return s_n;
}
