#include "common.h"

#ifndef TILE
#define TILE 16
#endif

/* GEMM: c[m x n] = a[m x k] * b[k x n], row-major; TILE x TILE tiles of a and b are staged in local
   memory, each work-item accumulates one element of c in DATA_TYPE. The global size is rounded up to
   TILE; out-of-range work-items load zeros and store nothing. */
__kernel void matmul(__global const STORAGE_TYPE *a,
                     __global const STORAGE_TYPE *b,
                     __global STORAGE_TYPE *c,
                     const int m, const int n, const int k) {
  __local DATA_TYPE a_tile[TILE][TILE];
  __local DATA_TYPE b_tile[TILE][TILE];
  const int col = GLOBAL_ID0, row = GLOBAL_ID1;
  const int lx = get_local_id(0), ly = get_local_id(1);
  DATA_TYPE acc = 0;
  for (int t = 0; t < k; t += TILE) {
    a_tile[ly][lx] = (row < m && t + lx < k) ? LOAD(a, row * k + t + lx) : (DATA_TYPE)0;
    b_tile[ly][lx] = (col < n && t + ly < k) ? LOAD(b, (t + ly) * n + col) : (DATA_TYPE)0;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = 0; i < TILE; ++i) {
      acc += a_tile[ly][i] * b_tile[i][lx];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (row < m && col < n) {
    STORE(c, row * n + col, acc);
  }
}
