/* Shared by every program of the library, as MACE's common.h is: a program that includes it is
   rebuilt when it changes (its hash is part of the program's program_hash_ entry). */
#ifndef DEPLOYER_COMMON_H
#define DEPLOYER_COMMON_H

#ifndef DATA_TYPE
#error "build with -DDATA_TYPE=<type>"
#endif

/* -DFP16: true half arithmetic (DATA_TYPE=half); only on devices with cl_khr_fp16. */
#ifdef FP16
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#endif

/* A test hook, never set by the library itself: -DERR=e makes every STORE write v + e * (1 + |v|), an
   error of exactly e in the terms of the smoke tolerance (|out - ref| <= tol * (1 + |ref|)). Tests build
   deliberately wrong variants with it to show that a tolerance is real. */
#ifdef ERR
inline DATA_TYPE with_err(const DATA_TYPE v) {
  return v + (DATA_TYPE)(ERR) * ((DATA_TYPE)1 + fabs(v));
}
#define WITH_ERR(v) with_err(v)
#else
#define WITH_ERR(v) (v)
#endif

/* Storage type of buffers vs DATA_TYPE, the type the math is done in. With -DSTORAGE_HALF buffers
   hold IEEE half values, read with vload_half and written with vstore_half (round to nearest even):
   core OpenCL, no cl_khr_fp16 needed, so half-size tensors work on every device. */
#ifdef STORAGE_HALF
#define STORAGE_TYPE half
#define LOAD(p, i) vload_half((i), (p))
#define STORE(p, i, v) vstore_half(WITH_ERR(v), (i), (p))
#else
#define STORAGE_TYPE DATA_TYPE
#define LOAD(p, i) ((p)[i])
#define STORE(p, i, v) ((p)[i] = WITH_ERR(v))
#endif

#define GLOBAL_ID0 ((int)get_global_id(0))
#define GLOBAL_ID1 ((int)get_global_id(1))
#define GLOBAL_ID2 ((int)get_global_id(2))

#endif
