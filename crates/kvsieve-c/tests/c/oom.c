/* Requests that pass validation but cannot be allocated. The harness runs this program
 * under an address-space limit (`ulimit -v`, 4 GiB), not under valgrind: a pool of 256 TiB
 * and a dense selection of UINT32_MAX tokens (16 GiB of indices) must each fail with
 * KVSIEVE_ERROR_OUT_OF_MEMORY, leave the out-parameter untouched, and leave the process
 * able to go on. Before fallible allocation both ended the process with SIGABRT. */
#include "common.h"

int main(void) {
    kvsieve_cache_config_t cfg = kvsieve_cache_config_default(1, 64, 512, 1024, (size_t)1 << 20);
    kvsieve_cache_t *cache = (kvsieve_cache_t *)&cfg;
    kvsieve_selection_t *sel = (kvsieve_selection_t *)&cfg;
    size_t n = 0;
    int failed_before = g_failed;

    EXPECT_ERR(kvsieve_cache_new(&cfg, &cache), KVSIEVE_ERROR_OUT_OF_MEMORY, "");
    CHECK(cache == (kvsieve_cache_t *)&cfg, "a failed kvsieve_cache_new leaves *out untouched");
    EXPECT_ERR(kvsieve_selection_dense(1, UINT32_MAX, &sel), KVSIEVE_ERROR_OUT_OF_MEMORY, "selection indices");
    CHECK(sel == (kvsieve_selection_t *)&cfg, "a failed kvsieve_selection_dense leaves *out untouched");
    EXPECT_ERR(kvsieve_selection_streaming(1, UINT32_MAX, 4, UINT32_MAX, &sel), KVSIEVE_ERROR_OUT_OF_MEMORY, "");
    section_done("huge requests are out-of-memory errors", failed_before);

    failed_before = g_failed;
    cfg = kvsieve_cache_config_default(1, 2, 64, 16, 8);
    if (EXPECT_OK(kvsieve_cache_new(&cfg, &cache))) kvsieve_cache_free(cache);
    if (EXPECT_OK(kvsieve_selection_dense(2, 1000, &sel))) {
        EXPECT_OK(kvsieve_selection_len(sel, &n));
        CHECK(n == 2000, "a dense selection of 2 x 1000 tokens holds %zu", n);
        kvsieve_selection_free(sel);
    }
    section_done("the process goes on after them", failed_before);
    return finish();
}
