#include "common.h"

/* Softmax of each row of x [rows][n]: one work-group per row, its work-items stride over the row and
   reduce the maximum, then the sum of exponentials, through `scratch` in local memory (one DATA_TYPE
   per work-item). The local size must be a power of two; global [local size * rows]. */

inline void reduce(__local DATA_TYPE *scratch, const int lid, const int size, const int take_max) {
  for (int half_size = size / 2; half_size > 0; half_size /= 2) {
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < half_size) {
      const DATA_TYPE other = scratch[lid + half_size];
      scratch[lid] = take_max ? fmax(scratch[lid], other) : scratch[lid] + other;
    }
  }
  barrier(CLK_LOCAL_MEM_FENCE);
}

__kernel void softmax(__global const STORAGE_TYPE *x, __global STORAGE_TYPE *out, const int n,
                      __local DATA_TYPE *scratch) {
  const int row = get_group_id(0), lid = get_local_id(0), size = get_local_size(0);
  __global const STORAGE_TYPE *in_row = x + row * n;
  DATA_TYPE best = -INFINITY;
  for (int i = lid; i < n; i += size) {
    best = fmax(best, LOAD(in_row, i));
  }
  scratch[lid] = best;
  reduce(scratch, lid, size, 1);
  best = scratch[0];
  barrier(CLK_LOCAL_MEM_FENCE);
  DATA_TYPE sum = 0;
  for (int i = lid; i < n; i += size) {
    sum += exp(LOAD(in_row, i) - best);
  }
  scratch[lid] = sum;
  reduce(scratch, lid, size, 0);
  sum = scratch[0];
  for (int i = lid; i < n; i += size) {
    STORE(out, row * n + i, exp(LOAD(in_row, i) - best) / sum);
  }
}
