/**
 * \file kvsieve/error.h
 *
 * \brief Errors: the stable error codes and the error object every fallible call returns
 * (NULL on success), with its message, code, parse offset and release.
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_ERROR_H
#define KVSIEVE_ERROR_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * \brief Stable numeric error codes. Values never change once released; new kinds of
 * error get new values.
 */
typedef enum kvsieve_error_code {
    /** No error (what kvsieve_error_code() returns for NULL). */
    KVSIEVE_OK = 0,
    /** An argument has a value outside what the call accepts. */
    KVSIEVE_ERROR_INVALID_ARGUMENT = 1,
    /** A tensor has the wrong shape or strides. */
    KVSIEVE_ERROR_SHAPE = 2,
    /** A tensor has a dtype the call does not accept. */
    KVSIEVE_ERROR_DTYPE = 3,
    /** A required pointer was NULL. */
    KVSIEVE_ERROR_NULL_POINTER = 4,
    /** A sequence id that the cache does not hold. */
    KVSIEVE_ERROR_UNKNOWN_SEQUENCE = 5,
    /** An index (token, slot, page, layer, head) is out of range. */
    KVSIEVE_ERROR_OUT_OF_RANGE = 6,
    /** The page pool has too few free pages for the request. */
    KVSIEVE_ERROR_OUT_OF_PAGES = 7,
    /** A configuration the library does not support (a head_dim, a device). */
    KVSIEVE_ERROR_UNSUPPORTED = 8,
    /** The CUDA driver or device is not available. */
    KVSIEVE_ERROR_CUDA_UNAVAILABLE = 9,
    /** Reading or writing a file failed, or its contents are malformed. */
    KVSIEVE_ERROR_IO = 10,
    /** Text (such as a policy) could not be parsed. */
    KVSIEVE_ERROR_PARSE = 11,
    /** A bug inside kvsieve (including a caught panic). Please report it. */
    KVSIEVE_ERROR_INTERNAL = 12,
    /** Memory for a buffer the call needs could not be allocated (the call changed nothing). */
    KVSIEVE_ERROR_OUT_OF_MEMORY = 13
} kvsieve_error_code_t;

/**
 * \brief An error returned by a fallible call. Opaque.
 *
 * Ownership: owned by the caller, who releases it with kvsieve_error_free().
 * Thread safety: an error may be read from any thread, and freed from any thread once
 * nobody reads it.
 */
typedef struct kvsieve_error kvsieve_error_t;

/**
 * \brief The error's message: the name of the function that failed, then what went wrong,
 * naming the parameter at fault and what was expected, e.g.
 * "kvsieve_cache_write: bad shape for `k`: expected [4, 2, 64], got [4, 2, 32]".
 *
 * \param error An error, or NULL (gives "").
 * \return A NUL-terminated UTF-8 string.
 *
 * Ownership: the string is borrowed from `error` and valid until kvsieve_error_free(error);
 * do not free it.
 *
 * Thread safety: thread-safe.
 */
const char *kvsieve_error_message(const kvsieve_error_t *error);

/**
 * \brief The error's stable code (a ::kvsieve_error_code_t value).
 *
 * \param error An error, or NULL (gives #KVSIEVE_OK).
 *
 * Ownership: `error` stays owned by the caller.
 *
 * Thread safety: thread-safe.
 */
kvsieve_error_code_t kvsieve_error_code(const kvsieve_error_t *error);

/**
 * \brief Where a parse error was found: the byte offset into the parsed text (for
 * kvsieve_policy_parse(), into `text`) of the token at fault, or the text's length when it
 * ended too early.
 *
 * \param error An error, or NULL.
 * \return The offset for an error with code #KVSIEVE_ERROR_PARSE; -1 for NULL and for every
 *         other error.
 *
 * Ownership: `error` stays owned by the caller.
 *
 * Thread safety: thread-safe.
 */
int64_t kvsieve_error_parse_offset(const kvsieve_error_t *error);

/**
 * \brief Release an error.
 *
 * \param error An error returned by kvsieve, or NULL (ignored). Ownership: taken; the
 *        error and its message must not be used afterwards.
 *
 * Thread safety: thread-safe for distinct errors.
 */
void kvsieve_error_free(kvsieve_error_t *error);

/**
 * \brief Short lowercase name of an error code ("ok", "null_pointer", "out_of_pages", ...);
 * "unknown" for a value kvsieve does not define.
 *
 * Ownership: a static string; do not free. Thread safety: thread-safe.
 */
const char *kvsieve_error_code_name(kvsieve_error_code_t code);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_ERROR_H */
