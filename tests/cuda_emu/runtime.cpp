// The emulator's execution engine: fibers for the threads of a block, `__syncthreads`,
// warp collectives (shuffles, ballot, mma.sync m16n8k16) and kernel launches. See
// kvs_emu.h for what the emulation shows and what it cannot.
#include "runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// Save the callee-saved registers on the current stack, store its pointer in *save, and
// continue on the stack `to` (which was left the same way, or prepared by `make_fiber`).
extern "C" void kvs_emu_switch(void** save, void* to);
asm(R"(
    .text
    .globl kvs_emu_switch
    .hidden kvs_emu_switch
    .type kvs_emu_switch,@function
kvs_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kvs_emu_switch, .-kvs_emu_switch
)");

namespace kvs_emu {

enum State { READY, AT_BARRIER, AT_WARP, DONE };
enum Kind { SHFL_IDX = 0, SHFL_UP = 1, SHFL_DOWN = 2, SHFL_XOR = 3, BALLOT = 4, MMA_F16 = 5, MMA_BF16 = 6 };

struct Slot {
    unsigned mask;
    int kind;
    int arg, width;
    uint64_t in[10];
    uint64_t out[4];
};

struct ThreadState {
    void* sp;
    State state;
    uint3 tid;
    unsigned linear;
    Slot slot;
};

ThreadState* cur;
uint3 cur_tid;
uint3 block_idx;
dim3 block_dim, grid_dim;

namespace {

constexpr size_t kStack = 256 << 10;
constexpr size_t kPage = 4096;

void* sched_sp;
std::vector<ThreadState> threads;
std::vector<char*> stacks;  // each kStack bytes above a guard page
unsigned nthreads;
void (*entry)(void**);
void** entry_args;
const char* kernel_name = "";
std::vector<uint64_t> smem;  // dynamic shared memory, 8-byte aligned
size_t smem_bytes;
std::string failure;
std::mutex launch_lock;
unsigned launch_count;

[[noreturn]] void fiber_main() {
    entry(entry_args);
    cur->state = DONE;
    kvs_emu_switch(&cur->sp, sched_sp);
    __builtin_unreachable();
}

void make_fiber(unsigned i) {
    while (stacks.size() <= i) {
        char* base = static_cast<char*>(mmap(nullptr, kStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (base == MAP_FAILED) {
            std::perror("kvsieve CUDA emulator: mmap of a fiber stack");
            std::abort();
        }
        mprotect(base, kPage, PROT_NONE);
        stacks.push_back(base + kPage);
    }
    uint64_t* sp = reinterpret_cast<uint64_t*>(stacks[i] + kStack);
    *--sp = 0;  // fiber_main's return address: never used
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp rbx r12..r15
    threads[i].sp = sp;
}

void yield() { kvs_emu_switch(&cur->sp, sched_sp); }

void fail(const std::string& why) {
    if (failure.empty()) failure = why;
}

std::string where(const ThreadState& t) {
    char b[96];
    std::snprintf(b, sizeof b, "thread (%u,%u,%u)", t.tid.x, t.tid.y, t.tid.z);
    return b;
}

// Run every thread of the current block to completion. False (with `failure` set) on a
// deadlock or a misused collective. Between two barriers the threads run one after another,
// in ascending order or (`reverse`) descending: a read of another thread's write that lacks
// a barrier sees the old value in one of the two orders, and launches alternate them.
bool run_block(bool reverse) {
    for (unsigned i = 0; i < nthreads; ++i) {
        ThreadState& t = threads[i];
        t.state = READY;
        t.linear = i;
        t.tid = make_uint3(i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y));
        make_fiber(i);
    }
    for (;;) {
        bool ran = false;
        for (unsigned k = 0; k < nthreads && failure.empty(); ++k) {
            ThreadState& t = threads[reverse ? nthreads - 1 - k : k];
            if (t.state != READY) continue;
            cur = &t;
            cur_tid = t.tid;
            kvs_emu_switch(&sched_sp, t.sp);
            ran = true;
        }
        if (!failure.empty()) return false;
        unsigned live = 0, barrier = 0, warp = 0;
        for (unsigned i = 0; i < nthreads; ++i) {
            if (threads[i].state == DONE) continue;
            ++live;
            barrier += threads[i].state == AT_BARRIER;
            warp += threads[i].state == AT_WARP;
        }
        if (live == 0) return true;
        if (barrier == live) {
            for (unsigned i = 0; i < nthreads; ++i)
                if (threads[i].state == AT_BARRIER) threads[i].state = READY;
            continue;
        }
        if (!ran) {
            char b[160];
            std::snprintf(b, sizeof b, "deadlock: %u live threads, %u at __syncthreads, %u at warp collectives whose lanes never all arrived", live, barrier, warp);
            fail(b);
            return false;
        }
    }
}

unsigned lanes_of(unsigned base) { return nthreads - base >= 32 ? 32 : nthreads - base; }

float f32_of(uint64_t u) {
    uint32_t w = (uint32_t)u;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
}

float half_of(uint32_t bits, bool bf16) {
    uint16_t h = (uint16_t)bits;
    if (bf16) {
        __nv_bfloat16 x;
        std::memcpy(&x, &h, 2);
        return __bfloat162float(x);
    }
    __half x;
    std::memcpy(&x, &h, 2);
    return __half2float(x);
}

void fire_mma(unsigned base, bool bf16) {
    double A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const Slot& s = threads[base + l].slot;
        const unsigned g = l >> 2, t = l & 3;
        for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = half_of((uint32_t)s.in[0] >> (16 * e), bf16);
            A[g + 8][2 * t + e] = half_of((uint32_t)s.in[1] >> (16 * e), bf16);
            A[g][2 * t + 8 + e] = half_of((uint32_t)s.in[2] >> (16 * e), bf16);
            A[g + 8][2 * t + 8 + e] = half_of((uint32_t)s.in[3] >> (16 * e), bf16);
            B[2 * t + e][g] = half_of((uint32_t)s.in[4] >> (16 * e), bf16);
            B[2 * t + 8 + e][g] = half_of((uint32_t)s.in[5] >> (16 * e), bf16);
            C[g][2 * t + e] = f32_of(s.in[6 + e]);
            C[g + 8][2 * t + e] = f32_of(s.in[8 + e]);
        }
    }
    for (unsigned l = 0; l < 32; ++l) {
        Slot& s = threads[base + l].slot;
        const unsigned g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
            const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            double acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
            float f = (float)acc;
            uint32_t w;
            std::memcpy(&w, &f, 4);
            s.out[i] = w;
        }
    }
}

void fire(unsigned base, unsigned mask, int kind) {
    if (kind == MMA_F16 || kind == MMA_BF16) {
        fire_mma(base, kind == MMA_BF16);
        return;
    }
    if (kind == BALLOT) {
        uint64_t bits = 0;
        for (unsigned l = 0; l < 32; ++l)
            if ((mask >> l) & 1 && threads[base + l].slot.in[0]) bits |= 1ull << l;
        for (unsigned l = 0; l < 32; ++l)
            if ((mask >> l) & 1) threads[base + l].slot.out[0] = bits;
        return;
    }
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1)) continue;
        Slot& s = threads[base + l].slot;
        const int w = s.width, seg = (int)l & ~(w - 1), pos = (int)l - seg;
        int src = (int)l;
        switch (kind) {
            case SHFL_IDX: src = seg + (s.arg & (w - 1)); break;
            case SHFL_UP: src = pos >= s.arg ? (int)l - s.arg : (int)l; break;
            case SHFL_DOWN: src = pos + s.arg < w ? (int)l + s.arg : (int)l; break;
            case SHFL_XOR: src = (int)l ^ s.arg; if (src < seg || src >= seg + w) src = (int)l; break;
        }
        // A source lane outside the mask gives an undefined value on a GPU; here, its own.
        if (src < 0 || src > 31 || !((mask >> src) & 1)) src = (int)l;
        s.out[0] = threads[base + src].slot.in[0];
    }
}

// The calling lane has filled its slot; wait until every lane of `mask` has reached a
// collective of the same kind and mask, then all of them continue with their results.
void arrive() {
    ThreadState* me = cur;
    const unsigned lane = me->linear & 31, base = me->linear & ~31u;
    const unsigned mask = me->slot.mask;
    if (!((mask >> lane) & 1)) {
        fail(where(*me) + ": warp collective with a mask that leaves out the calling lane");
        yield();
    }
    if (me->slot.width <= 0 || me->slot.width > 32 || (me->slot.width & (me->slot.width - 1))) {
        fail(where(*me) + ": shuffle width must be a power of two up to 32");
        yield();
    }
    const unsigned n = lanes_of(base);
    if (n < 32 && (mask >> n)) {
        fail(where(*me) + ": warp collective names lanes past the end of the block");
        yield();
    }
    me->state = AT_WARP;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1)) continue;
        const ThreadState& o = threads[base + l];
        if (o.state != AT_WARP || o.slot.mask != mask || o.slot.kind != me->slot.kind) {
            yield();  // resumed once the last lane has fired the collective
            return;
        }
    }
    fire(base, mask, me->slot.kind);
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1) threads[base + l].state = READY;
}

// Names of the kernels launched in this process, appended at exit to the file named by
// KVSIEVE_EMU_LAUNCHED (how scripts/cuda-emu.sh reports kernels no test ran).
struct LaunchLog {
    std::map<std::string, unsigned long> counts;
    ~LaunchLog() {
        const char* path = std::getenv("KVSIEVE_EMU_LAUNCHED");
        if (!path || counts.empty()) return;
        if (FILE* f = std::fopen(path, "a")) {
            for (auto& [name, n] : counts) std::fprintf(f, "%s %lu\n", name.c_str(), n);
            std::fclose(f);
        }
    }
} launched;

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> m;
    return m;
}

void on_fault(int sig) {
    char b[256];
    int n = std::snprintf(b, sizeof b, "\nkvsieve CUDA emulator: signal %d in kernel %s, block (%u,%u,%u), thread (%u,%u,%u): out-of-bounds access?\n",
                          sig, kernel_name, block_idx.x, block_idx.y, block_idx.z, cur_tid.x, cur_tid.y, cur_tid.z);
    if (n > 0) (void)!write(2, b, (size_t)n);
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
    static thread_local bool done = false;
    if (done) return;
    done = true;
    stack_t ss;
    ss.ss_size = 64 << 10;
    ss.ss_sp = std::malloc(ss.ss_size);
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

void syncthreads() {
    cur->state = AT_BARRIER;
    yield();
}

void* dyn_smem() { return smem.data(); }

uint64_t warp_shfl(unsigned mask, int kind, uint64_t value, int arg, int width) {
    Slot& s = cur->slot;
    s.mask = mask;
    s.kind = kind;
    s.in[0] = value;
    s.arg = arg;
    s.width = width;
    arrive();
    return cur->slot.out[0];
}

void mma_m16n8k16(bool bf16, float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    Slot& s = cur->slot;
    s.mask = 0xffffffffu;
    s.kind = bf16 ? MMA_BF16 : MMA_F16;
    s.width = 32;
    s.arg = 0;
    for (int i = 0; i < 4; ++i) s.in[i] = a[i];
    s.in[4] = b0;
    s.in[5] = b1;
    for (int i = 0; i < 4; ++i) {
        uint32_t w;
        std::memcpy(&w, &c[i], 4);
        s.in[6 + i] = w;
    }
    arrive();
    for (int i = 0; i < 4; ++i) c[i] = f32_of(cur->slot.out[i]);
}

Reg::Reg(const char* name, void (*fn)(void**), size_t param_bytes) { registry()[name] = Kernel{fn, param_bytes}; }

const Kernel* find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

bool launch(const char* name, void (*fn)(void**), dim3 grid, dim3 block, size_t shared, void** params, std::string* error) {
    std::lock_guard<std::mutex> guard(launch_lock);
    install_fault_handler();
    const uint64_t n = (uint64_t)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || block.z > 64) {
        *error = "block of " + std::to_string(n) + " threads (1..1024 allowed)";
        return false;
    }
    if (shared > 227u * 1024) {
        *error = "dynamic shared memory of " + std::to_string(shared) + " bytes (227 KiB at most)";
        return false;
    }
    if (grid.y > 65535 || grid.z > 65535) {
        *error = "grid y or z over 65535";
        return false;
    }
    kernel_name = name;
    ++launched.counts[name];
    ++launch_count;
    entry = fn;
    entry_args = params;
    nthreads = (unsigned)n;
    if (threads.size() < n) threads.resize(n);
    block_dim = block;
    grid_dim = grid;
    smem_bytes = shared;
    smem.assign((shared + 7) / 8 + 1, 0);
    failure.clear();
    // Blocks run one after another, in index order or (every other launch) in reverse, so a
    // block that depends on another block of the same launch having run shows in one of them.
    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    const bool backwards = (launch_count >> 1) & 1;
    for (uint64_t i = 0; i < nblocks; ++i) {
        const uint64_t b = backwards ? nblocks - 1 - i : i;
        const unsigned x = (unsigned)(b % grid.x), y = (unsigned)(b / grid.x % grid.y), z = (unsigned)(b / ((uint64_t)grid.x * grid.y));
        block_idx = make_uint3(x, y, z);
        // Shared memory starts as garbage on a GPU: NaN bytes here.
        std::memset(smem.data(), 0xff, smem.size() * 8);
        if (!run_block(((x + y + z) ^ launch_count) & 1)) {
            char msg[96];
            std::snprintf(msg, sizeof msg, " (block (%u,%u,%u))", x, y, z);
            *error = failure + msg;
            return false;
        }
    }
    return true;
}

}  // namespace kvs_emu
