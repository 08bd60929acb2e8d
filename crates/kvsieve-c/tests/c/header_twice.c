/* The header included twice (the include guard must hold), compiled as C99 and as C++,
 * plus the calls that need no cache: version, ISA, error codes and their names, and the
 * NULL-tolerant release functions. */
#include "kvsieve.h"
#include "kvsieve.h"

#include <stdio.h>
#include <string.h>

static int passed = 0;
static int failed = 0;

static void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL: %s\n", what);
    }
}

int main(void) {
    char header_version[32];
    const char *isa;
    unsigned code;
    static const char *const names[] = {"ok",           "invalid_argument", "shape",        "dtype",
                                        "null_pointer", "unknown_sequence", "out_of_range", "out_of_pages",
                                        "unsupported",  "cuda_unavailable", "io",           "parse",
                                        "internal",     "out_of_memory"};

    /* Version: the header's macros match the library it runs against. */
    snprintf(header_version, sizeof header_version, "%d.%d.%d", KVSIEVE_VERSION_MAJOR, KVSIEVE_VERSION_MINOR,
             KVSIEVE_VERSION_PATCH);
    check(strcmp(kvsieve_version(), KVSIEVE_VERSION) == 0, "kvsieve_version() == KVSIEVE_VERSION");
    check(strcmp(kvsieve_version(), KVSIEVE_VERSION_STRING) == 0, "kvsieve_version() == KVSIEVE_VERSION_STRING");
    check(strcmp(header_version, KVSIEVE_VERSION) == 0, "version macros agree");
    check(kvsieve_version_major() == KVSIEVE_VERSION_MAJOR, "major");
    check(kvsieve_version_minor() == KVSIEVE_VERSION_MINOR, "minor");
    check(kvsieve_version_patch() == KVSIEVE_VERSION_PATCH, "patch");
    printf("version %s\n", kvsieve_version());

    isa = kvsieve_isa();
    check(isa != NULL && strlen(isa) > 0, "kvsieve_isa() is a non-empty string");
    printf("isa %s\n", isa);

    /* Error codes: values, names, and NULL handling. */
    check(KVSIEVE_OK == 0 && KVSIEVE_ERROR_INTERNAL == 12 && KVSIEVE_ERROR_OUT_OF_MEMORY == 13, "enum values");
    for (code = 0; code <= 13; code++) {
        check(strcmp(kvsieve_error_code_name((kvsieve_error_code_t)code), names[code]) == 0, names[code]);
    }
    check(strcmp(kvsieve_error_code_name((kvsieve_error_code_t)999), "unknown") == 0, "unknown code name");
    check(kvsieve_error_code(NULL) == KVSIEVE_OK, "kvsieve_error_code(NULL) == KVSIEVE_OK");
    check(strcmp(kvsieve_error_message(NULL), "") == 0, "kvsieve_error_message(NULL) == \"\"");
    kvsieve_error_free(NULL);
    kvsieve_cache_free(NULL);
    check(1, "free functions accept NULL");

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
