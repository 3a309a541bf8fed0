// Copy many blocks across many cache tensors in one launch (see reference.copy_blocks).
//
// Grid (num_pairs, num_caches). Cache c is a device pointer with block_bytes[c] bytes per block (its
// dim 0); CTA (i, c) copies block src[i] to dst[i] of cache c with 16-byte accesses when the block size
// allows, else bytewise. Sources and destinations must be disjoint (no pair reads a block another writes).

__global__ void __launch_bounds__(256) copy_blocks(
    const u64 *__restrict__ ptrs, const long long *__restrict__ block_bytes,
    const long long *__restrict__ src, const long long *__restrict__ dst)
{
  const int i = blockIdx.x, c = blockIdx.y;
  const long long nb = block_bytes[c];
  char *base = reinterpret_cast<char *>(ptrs[c]);
  const char *from = base + src[i] * nb;
  char *to = base + dst[i] * nb;
  if ((nb & 15) == 0 && ((ptrs[c] & 15) == 0)) {
    const long long n16 = nb >> 4;
    const uint4 *f = reinterpret_cast<const uint4 *>(from);
    uint4 *t = reinterpret_cast<uint4 *>(to);
    long long j = threadIdx.x;
    for (; j + 3 * blockDim.x < n16; j += 4 * blockDim.x) {
      uint4 a = ld_stream16(f + j), b = ld_stream16(f + j + blockDim.x);
      uint4 c2 = ld_stream16(f + j + 2 * blockDim.x), d = ld_stream16(f + j + 3 * blockDim.x);
      t[j] = a; t[j + blockDim.x] = b; t[j + 2 * blockDim.x] = c2; t[j + 3 * blockDim.x] = d;
    }
    for (; j < n16; j += blockDim.x) t[j] = ld_stream16(f + j);
  } else {
    for (long long j = threadIdx.x; j < nb; j += blockDim.x) to[j] = from[j];
  }
}
