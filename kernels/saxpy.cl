#include "common.h"

/* out = a * x + y */
__kernel void saxpy(const DATA_TYPE a,
                    __global const DATA_TYPE *x,
                    __global const DATA_TYPE *y,
                    __global DATA_TYPE *out,
                    const int n) {
  const int i = GLOBAL_ID0;
  if (i < n) {
    out[i] = a * x[i] + y[i];
  }
}
