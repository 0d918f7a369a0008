#include "common.h"

/* Elementwise sum of two tensors of n elements (a residual connection). global [n]. */
__kernel void eltwise_add(__global const STORAGE_TYPE *a, __global const STORAGE_TYPE *b,
                          __global STORAGE_TYPE *out, const int n) {
  const int i = GLOBAL_ID0;
  if (i < n) {
    STORE(out, i, LOAD(a, i) + LOAD(b, i));
  }
}
