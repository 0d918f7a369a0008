/* Shared by every program of the library, as MACE's common.h is: a program that includes it is
   rebuilt when it changes (its hash is part of the program's program_hash_ entry). */
#ifndef DEPLOYER_COMMON_H
#define DEPLOYER_COMMON_H

#ifndef DATA_TYPE
#error "build with -DDATA_TYPE=<type>"
#endif

#define GLOBAL_ID0 ((int)get_global_id(0))
#define GLOBAL_ID1 ((int)get_global_id(1))

#endif
