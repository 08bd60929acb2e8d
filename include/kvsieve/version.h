/**
 * \file kvsieve/version.h
 *
 * \brief Versions: the version of these headers (macros), the version of the library
 * linked at run time, and the SIMD instruction set its CPU kernels chose on this machine.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 *
 * **Compatibility.** The shared library's SONAME is `libkvsieve.so.MAJOR`, so
 * `libkvsieve.so.0` for every 0.x release: before 1.0 too, a minor release is not a new ABI.
 * Within one major version a newer library runs programs built against older headers: a
 * program built with the headers of version X.Y runs with any library X.Y' where Y' >= Y (an
 * older library may lack what minor Y added: a program can check at start-up that
 * kvsieve_version_minor() >= #KVSIEVE_VERSION_MINOR). A minor release may only add: functions, enum values,
 * macros, and fields at the end of a versioned struct (one that begins with `struct_size`,
 * see kvsieve.h); it never removes, renames or reorders any of them, nor changes the
 * arguments of a function or the type, meaning or default of an existing field. A patch
 * release changes no declaration. Any other change comes with a new major version, and so a
 * new SONAME. The reverse does not hold: a program built against newer headers may call
 * functions an older library lacks, and passes versioned structs larger than that library
 * knows, which it refuses (#KVSIEVE_ERROR_INVALID_ARGUMENT naming `struct_size`). A program
 * should treat an error code or other enum value it does not know, returned by a newer
 * library, as kvsieve_error_code_name() does: as unknown, not as a crash.
 */

#ifndef KVSIEVE_VERSION_H
#define KVSIEVE_VERSION_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** \brief Major version of this header. Compare with kvsieve_version_major(). */
#define KVSIEVE_VERSION_MAJOR 0
/** \brief Minor version of this header. Compare with kvsieve_version_minor(). */
#define KVSIEVE_VERSION_MINOR 1
/** \brief Patch version of this header. Compare with kvsieve_version_patch(). */
#define KVSIEVE_VERSION_PATCH 0
/** \brief Version of this header as a string. */
#define KVSIEVE_VERSION "0.1.0"
/** \brief Version of this header as a string, the same as #KVSIEVE_VERSION. Compare with
 *  kvsieve_version(). */
#define KVSIEVE_VERSION_STRING KVSIEVE_VERSION

/**
 * \brief The library's version, "MAJOR.MINOR.PATCH".
 *
 * Ownership: a static string; do not free. Thread safety: thread-safe.
 */
const char *kvsieve_version(void);

/**
 * \brief The library's major version. Thread safety: thread-safe.
 *
 * Ownership: returns a value; nothing to free.
 */
uint32_t kvsieve_version_major(void);

/**
 * \brief The library's minor version. Thread safety: thread-safe.
 *
 * Ownership: returns a value; nothing to free.
 */
uint32_t kvsieve_version_minor(void);

/**
 * \brief The library's patch version. Thread safety: thread-safe.
 *
 * Ownership: returns a value; nothing to free.
 */
uint32_t kvsieve_version_patch(void);

/**
 * \brief The SIMD instruction set the CPU kernels use on this machine, chosen at run time
 * ("avx512f+avx2+fma+f16c", "avx2+fma+f16c" or "portable"; the environment variable
 * KVSIEVE_ISA=avx2 or portable, read once per process, lowers it).
 *
 * Ownership: a static string; do not free. Thread safety: thread-safe.
 */
const char *kvsieve_isa(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_VERSION_H */
